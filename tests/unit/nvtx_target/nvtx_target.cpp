// A program that uses NVTX but never CUDA, run by tests/unit/test_exec_profile.cpp under
// NVTX_INJECTION64_PATH=libktune_inject.so: it checks the injection's NVTX recorders and its
// exit and signal flushes on a machine without a GPU.
//
//   ktune_nvtx_target STEPS [exit|sigterm|sigint-handled]
//
// STEPS ranges "step" (push/pop), each holding "attention" (push/pop), "moe" (start/end) and a
// payload range "dom_range" in domain "mydomain"; one range on a second thread; a range left
// open. Then: exit 0, or raise SIGTERM (default action), or raise SIGINT with a handler of its
// own installed first (then exit 4).
#include <nvtx3/nvToolsExt.h>
#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <thread>

namespace {
void on_sigint(int) {}
}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 3;
  const char* end = argc > 2 ? argv[2] : "exit";
  if (std::strcmp(end, "sigint-handled") == 0) signal(SIGINT, on_sigint);
  nvtxDomainHandle_t d = nvtxDomainCreateA("mydomain");
  for (int i = 0; i < steps; ++i) {
    nvtxRangePushA("step");
    nvtxRangePushA("attention");
    usleep(300);
    nvtxRangePop();
    const nvtxRangeId_t r = nvtxRangeStartA("moe");
    usleep(200);
    nvtxRangeEnd(r);
    nvtxEventAttributes_t a{};
    a.version = NVTX_VERSION;
    a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
    a.messageType = NVTX_MESSAGE_TYPE_ASCII;
    a.message.ascii = "dom_range";
    a.payloadType = NVTX_PAYLOAD_TYPE_INT32;
    a.payload.iValue = i;
    nvtxDomainRangePushEx(d, &a);
    nvtxDomainRangePop(d);
    nvtxRangePop();
  }
  std::thread([] {
    nvtxRangePushA("worker");
    usleep(100);
    nvtxRangePop();
  }).join();
  nvtxRangePushA("left_open");
  if (std::strcmp(end, "sigterm") == 0) raise(SIGTERM);
  if (std::strcmp(end, "sigint-handled") == 0) {
    raise(SIGINT);
    return 4;
  }
  return 0;
}
