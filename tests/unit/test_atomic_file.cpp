// AtomicFile: the output appears whole at commit, or not at all, and never leaves temp files.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "ktune/engine/atomic_file.h"
#include "ktune/engine/error.h"

namespace {

namespace fs = std::filesystem;

class AtomicFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "ktune_atomic_XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(dir_, ec);
  }
  std::string file(const std::string& name) const { return (fs::path(dir_) / name).string(); }
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().filename());
    return out;
  }
  static std::string read_all(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  std::string dir_;
};

TEST_F(AtomicFileTest, CommitMakesTheFileAppear) {
  const std::string path = file("out.txt");
  ktune::write_file_atomic(path, "hello\n");
  EXPECT_EQ(read_all(path), "hello\n");
  EXPECT_EQ(entries(), std::vector<std::string>{"out.txt"});

  // Large and small writes mixed, crossing the 1 MiB buffer both ways.
  std::string expected;
  {
    ktune::AtomicFile f(file("big.bin"));
    for (int k = 0; k < 50; ++k) {
      const size_t n = (k % 3 == 0) ? (size_t{3} << 20) / 2 : static_cast<size_t>(k * 977);
      std::string chunk(n, static_cast<char>('a' + k % 26));
      f.write(chunk);
      expected += chunk;
    }
    EXPECT_EQ(f.bytes_written(), expected.size());
    EXPECT_FALSE(fs::exists(file("big.bin")));
    EXPECT_TRUE(fs::exists(f.temp_path()));
    EXPECT_EQ(fs::path(f.temp_path()).parent_path(), fs::path(dir_));
    EXPECT_NE(f.temp_path().find("big.bin.tmp." + std::to_string(::getpid()) + "."),
              std::string::npos);
    f.commit();
    EXPECT_THROW(f.commit(), ktune::Error);
    EXPECT_THROW(f.write("x"), ktune::Error);
  }
  EXPECT_EQ(read_all(file("big.bin")), expected);
  EXPECT_EQ(entries().size(), 2u);
}

TEST_F(AtomicFileTest, NoCommitLeavesNothing) {
  const std::string path = file("out.txt");
  std::string temp;
  try {
    ktune::AtomicFile f(path);
    temp = f.temp_path();
    f.write(std::string(3 << 20, 'x'));
    throw std::runtime_error("simulated failure");
  } catch (const std::runtime_error&) {
  }
  EXPECT_FALSE(temp.empty());
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(temp));
  EXPECT_TRUE(entries().empty());
}

TEST_F(AtomicFileTest, OverwriteKeepsOldFileUntilCommit) {
  const std::string path = file("config.yaml");
  ktune::write_file_atomic(path, "old");
  ::chmod(path.c_str(), 0600);
  {
    ktune::AtomicFile f(path);
    f.write("new content");
    EXPECT_EQ(read_all(path), "old");
    f.commit();
  }
  EXPECT_EQ(read_all(path), "new content");
  struct stat st {};
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);  // a replaced file keeps its permissions
  {
    ktune::AtomicFile f(path);
    f.write("abandoned");
  }
  EXPECT_EQ(read_all(path), "new content");
  EXPECT_EQ(entries(), std::vector<std::string>{"config.yaml"});
}

TEST_F(AtomicFileTest, UnwritableFolderIsAnError) {
  const std::string missing = file("no/such/folder/out.txt");
  try {
    ktune::AtomicFile f(missing);
    ADD_FAILURE() << "no error";
  } catch (const ktune::Error& e) {
    EXPECT_EQ(e.where(), missing);
    EXPECT_NE(std::string(e.what()).find("No such file or directory"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(ktune::write_file_atomic(missing, "x"), ktune::Error);
  // The output path is a folder, or names no file at all.
  EXPECT_THROW(ktune::AtomicFile f(dir_), ktune::Error);
  EXPECT_THROW(ktune::AtomicFile f(dir_ + "/"), ktune::Error);
  EXPECT_THROW(ktune::AtomicFile f(""), ktune::Error);
  EXPECT_TRUE(entries().empty());

  if (::geteuid() != 0) {  // root writes anywhere
    fs::create_directory(file("ro"));
    fs::permissions(file("ro"), fs::perms::owner_read | fs::perms::owner_exec);
    try {
      ktune::write_file_atomic(file("ro/out.txt"), "x");
      ADD_FAILURE() << "no error";
    } catch (const ktune::Error& e) {
      EXPECT_NE(std::string(e.what()).find("Permission denied"), std::string::npos) << e.what();
    }
    fs::permissions(file("ro"), fs::perms::owner_all);
  }
}

}  // namespace
