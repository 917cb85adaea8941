// Whether this machine has a usable GPU. Any failure of cudaGetDeviceCount (no driver, driver
// too old, no device) means "no GPU", with the reason kept for reports and skipped tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ktune {

struct GpuDevice {
  int index = 0;
  std::string name;
  int64_t total_bytes = 0;
  int sm_major = 0;
  int sm_minor = 0;
};

struct GpuInfo {
  std::vector<GpuDevice> devices;
  std::string unavailable_reason;  // set when devices is empty
  int driver_version = 0;          // e.g. 13000; 0 when unknown
};

GpuInfo query_gpus();

}  // namespace ktune
