// Which SIMD kernel set this CPU can run. An instruction set counts only when the CPU has it AND
// the OS saves its registers on context switch (XCR0), otherwise the first AVX-512 instruction
// would fault on kernels that leave ZMM state disabled.
#include <cctype>
#include <cstdlib>
#include <string>

#include "cpu/dot_kernels.h"
#include "ktune/engine/cpu_kernels.h"
#include "ktune/engine/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define KTUNE_X86 1
#endif

namespace ktune::cpu {
namespace {

#if defined(KTUNE_X86)
uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  // Inline asm because the _xgetbv intrinsic would need -mxsave for this portable file.
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

Isa hardware_isa_uncached() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return Isa::Scalar;
  const bool fma = ecx & (1u << 12);
  const bool osxsave = ecx & (1u << 27);
  const bool avx = ecx & (1u << 28);
  const bool f16c = ecx & (1u << 29);
  if (!osxsave || !avx) return Isa::Scalar;
  const uint64_t xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;    // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;  // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!os_ymm) return Isa::Scalar;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return Isa::Scalar;
  const bool avx2 = ebx & (1u << 5);
  const bool avx512f = ebx & (1u << 16);
  const bool avx512dq = ebx & (1u << 17);
  const bool avx512bw = ebx & (1u << 30);
  const bool avx512vl = ebx & (1u << 31);
  const bool avx512vnni = ecx & (1u << 11);
  if (!(avx2 && fma && f16c)) return Isa::Scalar;
  if (!(os_zmm && avx512f && avx512dq && avx512bw && avx512vl)) return Isa::Avx2;
  return avx512vnni ? Isa::Avx512Vnni : Isa::Avx512;
}
#else
Isa hardware_isa_uncached() { return Isa::Scalar; }
#endif

}  // namespace

Isa detail::hardware_isa() {
  static const Isa isa = hardware_isa_uncached();
  return isa;
}

bool detail::cpu_vendor_is_amd() {
#if defined(KTUNE_X86)
  static const bool amd = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    return ebx == 0x68747541u && edx == 0x69746E65u && ecx == 0x444D4163u;  // "AuthenticAMD"
  }();
  return amd;
#else
  return false;
#endif
}

Isa detect_isa() {
  const Isa hw = detail::hardware_isa();
  const char* env = std::getenv("KTUNE_ISA");
  if (env == nullptr || *env == '\0') return hw;
  std::string want(env);
  for (char& c : want) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni}) {
    if (want == isa_name(isa)) return isa < hw ? isa : hw;  // lowers, never raises
  }
  throw_usage("KTUNE_ISA", "unknown instruction set '" + std::string(env) + "'",
              "set it to one of scalar, avx2, avx512, avx512vnni, or unset it to use the best "
              "this CPU has (" +
                  std::string(isa_name(hw)) + ")");
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return "scalar";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx512Vnni:
      return "avx512vnni";
  }
  return "unknown";
}

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni}) {
    if (isa <= detail::hardware_isa()) out.push_back(isa);
  }
  return out;
}

}  // namespace ktune::cpu
