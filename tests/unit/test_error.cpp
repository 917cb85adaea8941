#include <gtest/gtest.h>

#include "ktune/engine/error.h"

TEST(Error, MessageHasWhereProblemFix) {
  ktune::Error e("model.gguf", "bad magic 0x12345678", "pass a GGUF v3 file");
  EXPECT_STREQ(e.what(), "model.gguf: bad magic 0x12345678; pass a GGUF v3 file");
  EXPECT_EQ(e.exit_code(), 1);
  try {
    ktune::throw_usage("--quant", "unknown type", "use one of ...");
    FAIL() << "throw_usage returned";
  } catch (const ktune::Error& u) {
    EXPECT_EQ(u.exit_code(), 2);
  }
}
