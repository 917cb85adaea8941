#include "ktune/engine/atomic_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>

#include "ktune/engine/error.h"
#include "ktune/engine/interrupt.h"

namespace ktune {
namespace {

constexpr size_t kBufferBytes = size_t{1} << 20;

std::string folder_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Test hook (tests/unit/test_faults_writes.cpp, docs/reliability.md): with
// KTUNE_TEST_PAUSE_BEFORE_RENAME=SUFFIX, a commit whose output path ends with SUFFIX waits up to a
// minute with the finished, fsynced temp file in place and the rename not done, so a test can
// kill -9 the process at the last moment a partial output could exist. Ctrl-C ends the wait.
void pause_before_rename_for_tests(const std::string& path) {
  const char* suffix = std::getenv("KTUNE_TEST_PAUSE_BEFORE_RENAME");
  if (suffix == nullptr || *suffix == 0) return;
  const size_t n = std::strlen(suffix);
  if (path.size() < n || path.compare(path.size() - n, n, suffix) != 0) return;
  for (int i = 0; i < 600 && !interrupted(); ++i) ::usleep(100000);
}

std::string random_suffix() {
  uint64_t r = 0;
  try {
    std::random_device rd;
    r = (uint64_t{rd()} << 32) ^ rd();
  } catch (...) {
    // random_device may be unavailable in minimal containers; the pid and O_EXCL already make
    // collisions harmless, this only spreads names.
  }
  r ^= static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  static const char hex[] = "0123456789abcdef";
  std::string s;
  for (int k = 0; k < 8; ++k) {
    s += hex[r & 15];
    r >>= 4;
  }
  return s;
}

std::string errno_text(int e) { return std::strerror(e); }

}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  if (path_.empty() || path_.back() == '/') {
    throw Error(path_.empty() ? std::string("output") : path_, "the output path names no file",
                "pass a file name for the output");
  }
  const std::string folder = folder_of(path_);
  struct stat st {};
  if (::stat(path_.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    throw Error(path_, "the output path is a folder", "pass a file name for the output");
  }
  const bool had_old = ::stat(path_.c_str(), &st) == 0 && S_ISREG(st.st_mode);
  int last_errno = 0;
  // O_EXCL makes a name collision (another process, a stale temp) fail instead of sharing a
  // file; a few fresh names get past it.
  for (int attempt = 0; attempt < 8 && fd_ < 0; ++attempt) {
    temp_path_ = path_ + ".tmp." + std::to_string(::getpid()) + "." + random_suffix();
    fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      last_errno = errno;
      if (last_errno != EEXIST && last_errno != EINTR) break;
    }
  }
  if (fd_ < 0) {
    temp_path_.clear();  // nothing to clean up
    throw Error(path_,
                "cannot create a file in folder '" + folder + "' (" + errno_text(last_errno) + ")",
                "check that the folder exists and that you may write to it, or choose another "
                "output path");
  }
  // Replacing a file should not silently change who may read it.
  if (had_old) ::fchmod(fd_, st.st_mode & 07777);
  signal_slot_ = register_temp_file(temp_path_);
  buffer_.reserve(kBufferBytes);
}

AtomicFile::~AtomicFile() {
  unregister_temp_file(signal_slot_);
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && !temp_path_.empty()) ::unlink(temp_path_.c_str());
}

void AtomicFile::write(const void* data, size_t n) {
  if (fd_ < 0) {
    throw Error(path_, "write after the file was committed or failed",
                "this is a bug in ktune; report it");
  }
  if (buffer_.size() + n > kBufferBytes) flush_buffer();
  if (n >= kBufferBytes) {
    // Large blocks go straight to the file instead of being copied through the buffer.
    write_all(static_cast<const char*>(data), n);
  } else {
    buffer_.append(static_cast<const char*>(data), n);
  }
  written_ += n;
}

void AtomicFile::flush_buffer() {
  write_all(buffer_.data(), buffer_.size());
  buffer_.clear();
}

// write(2) until every byte is out, retrying on EINTR and short writes.
void AtomicFile::write_all(const char* p, size_t left) {
  while (left > 0) {
    const ssize_t w = ::write(fd_, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      throw Error(path_, "cannot write '" + temp_path_ + "' (" + errno_text(e) + ")",
                  e == ENOSPC ? "free disk space or write to another disk"
                              : "check free disk space and the folder's permissions");
    }
    p += w;
    left -= static_cast<size_t>(w);
  }
}

void AtomicFile::commit() {
  if (committed_ || fd_ < 0) {
    throw Error(path_, "commit called twice or after a failure",
                "this is a bug in ktune; "
                "report it");
  }
  flush_buffer();
  if (::fsync(fd_) != 0) {
    const int e = errno;
    throw Error(path_, "cannot flush '" + temp_path_ + "' to disk (" + errno_text(e) + ")",
                "check free disk space and the disk's health");
  }
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    const int e = errno;
    throw Error(path_, "cannot close '" + temp_path_ + "' (" + errno_text(e) + ")",
                "check free disk space and the disk's health");
  }
  pause_before_rename_for_tests(path_);
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    const int e = errno;
    throw Error(
        path_,
        "cannot move the finished file '" + temp_path_ + "' into place (" + errno_text(e) + ")",
        "check that you may replace the output file and that it is not a folder");
  }
  committed_ = true;
  unregister_temp_file(signal_slot_);
  signal_slot_ = -1;
  // The rename is only durable once the folder entry is on disk.
  const std::string folder = folder_of(path_);
  const int dfd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    const int rc = ::fsync(dfd);
    const int e = errno;
    ::close(dfd);
    // Some file systems cannot sync a folder (EINVAL); the data itself is synced already.
    if (rc != 0 && e != EINVAL && e != EROFS) {
      throw Error(path_, "cannot flush folder '" + folder + "' to disk (" + errno_text(e) + ")",
                  "check the disk's health; the file is written but may not survive a crash");
    }
  }
}

std::vector<std::string> remove_stale_temps(const std::string& path, double min_age_s) {
  std::vector<std::string> removed;
  const std::string folder = folder_of(path);
  const size_t slash = path.find_last_of('/');
  const std::string prefix = (slash == std::string::npos ? path : path.substr(slash + 1)) + ".tmp.";
  DIR* dir = ::opendir(folder.c_str());
  if (dir == nullptr) return removed;
  const double now = static_cast<double>(std::time(nullptr));
  while (const dirent* e = ::readdir(dir)) {
    const std::string name = e->d_name;
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
    // <pid>.<8 hex digits>
    const std::string rest = name.substr(prefix.size());
    const size_t dot = rest.find('.');
    if (dot == std::string::npos || dot == 0 || dot > 10 || rest.size() - dot - 1 != 8) continue;
    if (rest.find_first_not_of("0123456789") != dot) continue;
    if (rest.find_first_not_of("0123456789abcdef", dot + 1) != std::string::npos) continue;
    const long pid = std::stol(rest.substr(0, dot));
    if (pid <= 0 || pid == ::getpid()) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive, or not ours
    const std::string full = (slash == std::string::npos ? "" : path.substr(0, slash + 1)) + name;
    struct stat st {};
    if (::lstat(full.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    if (now - static_cast<double>(st.st_mtime) < min_age_s) continue;
    if (::unlink(full.c_str()) == 0) removed.push_back(full);
  }
  ::closedir(dir);
  return removed;
}

void write_file_atomic(const std::string& path, const std::string& content) {
  AtomicFile f(path);
  f.write(content);
  f.commit();
}

}  // namespace ktune
