#include "model/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "ktune/engine/error.h"

namespace ktune::detail {

MappedFile map_file_readonly(const std::string& path, const char* kind) {
  const std::string what = std::string("the ") + kind + " file";
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int e = errno;
    if (e == ENOENT) {
      throw Error(path, what + " does not exist",
                  "check the path (it is relative to the folder "
                  "ktune runs in)");
    }
    if (e == EACCES || e == EPERM) {
      throw Error(path, "cannot read " + what + " (" + std::strerror(e) + ")",
                  "check its permissions or run as a user that may read it");
    }
    throw Error(path, "cannot open " + what + " (" + std::strerror(e) + ")",
                "check the path and that the file is readable");
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw Error(path, "cannot stat " + what + " (" + std::strerror(e) + ")",
                "check the path and that the file is readable");
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw Error(path, "is a folder, not a " + std::string(kind) + " file",
                "pass the path of the file itself");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path, "is not a regular file (ktune maps model files into memory)",
                "copy it to a regular file first");
  }
  if (st.st_size == 0) {
    ::close(fd);
    throw Error(path, what + " is empty (0 bytes)",
                "it was probably not fully downloaded or written; download or create it again");
  }
  if (static_cast<uint64_t>(st.st_size) > std::numeric_limits<size_t>::max()) {
    ::close(fd);
    throw Error(path, what + " is larger than this process can map", "use a 64-bit build of ktune");
  }
  const size_t size = static_cast<size_t>(st.st_size);
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);  // the mapping keeps its own reference to the file
  if (p == MAP_FAILED) {
    throw Error(path, "cannot map " + what + " into memory (" + std::strerror(map_errno) + ")",
                "check free address space and limits (ulimit -v)");
  }
  MappedFile m;
  m.data = static_cast<const uint8_t*>(p);
  m.size = size;
  m.keep = std::shared_ptr<void>(p, [size](void* q) { ::munmap(q, size); });
  return m;
}

}  // namespace ktune::detail
