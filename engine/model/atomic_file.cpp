#include "ktune/engine/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>

#include "ktune/engine/error.h"

namespace ktune {
namespace {

constexpr size_t kBufferBytes = size_t{1} << 20;

std::string folder_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
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
  buffer_.reserve(kBufferBytes);
}

AtomicFile::~AtomicFile() {
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
    const char* p = static_cast<const char*>(data);
    size_t left = n;
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
  } else {
    buffer_.append(static_cast<const char*>(data), n);
  }
  written_ += n;
}

void AtomicFile::flush_buffer() {
  const char* p = buffer_.data();
  size_t left = buffer_.size();
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
  buffer_.clear();
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
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    const int e = errno;
    throw Error(
        path_,
        "cannot move the finished file '" + temp_path_ + "' into place (" + errno_text(e) + ")",
        "check that you may replace the output file and that it is not a folder");
  }
  committed_ = true;
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

void write_file_atomic(const std::string& path, const std::string& content) {
  AtomicFile f(path);
  f.write(content);
  f.commit();
}

}  // namespace ktune
