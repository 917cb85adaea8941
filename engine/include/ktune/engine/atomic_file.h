// Outputs are never left half-written: AtomicFile writes to a temporary file beside the target
// and only commit() moves it into place (write, fsync, rename, fsync of the folder). A file that
// is destroyed without commit() removes its temporary file, so a failure or an exception leaves
// the old output (or nothing) under the output name.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ktune {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);  // throws ktune::Error when the folder is not writable
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);  // buffered; throws ktune::Error on I/O failure
  void write(const std::string& s) { write(s.data(), s.size()); }
  uint64_t bytes_written() const { return written_; }
  void commit();  // flush, fsync, rename over the target

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_path_; }

 private:
  void flush_buffer();
  void write_all(const char* p, size_t n);
  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
  bool committed_ = false;
  uint64_t written_ = 0;
  std::string buffer_;
  int signal_slot_ = -1;  // interrupt.h: a second Ctrl-C removes the temp file before dying
};

// kill -9 (or a power cut) leaves the temp file `<path>.tmp.<pid>.<random>` behind; it is never
// mistaken for the output and is safe to delete. This removes such leftovers for `path`: files
// named `<path>.tmp.<pid>.<8 hex digits>` whose process no longer exists (kill(pid, 0) fails
// with ESRCH) and that nobody modified for `min_age_s` seconds (a guard for writers in another
// pid namespace or on another host sharing the folder). Returns the paths it removed.
std::vector<std::string> remove_stale_temps(const std::string& path, double min_age_s = 60);

// Writes a whole string atomically.
void write_file_atomic(const std::string& path, const std::string& content);

}  // namespace ktune
