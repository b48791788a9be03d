// AMX tile set-up shared by the kernels that use tiles (amx_linear_cpu.cpp, prefill_attention_cpu.cpp).
// Include only where __AMX_TILE__ / __AMX_BF16__ are defined (built with -march=native on such a CPU).
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace llmserve_amx {

// Every tile 16 rows x 64 bytes (tmm0-7): one 16 x 32 bf16 A/B tile, or a 16 x 16 fp32 C tile.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Linux hands out the AMX register state only to processes that ask (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without it the first tile instruction faults.
inline bool amx_usable() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

// Loads TileConfig on this thread for the scope's lifetime. The tile configuration is per thread,
// and the kernels run on torch's threads: whoever configured tiles on them before (oneDNN, ATen's
// brgemm, which skip reconfiguring when they believe their palette is still loaded) gets its
// configuration back at the end, or the init state if there was none.
class TileScope {
 public:
  TileScope() {
    _tile_storeconfig(saved_);  // 64 zero bytes when nothing is configured
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  ~TileScope() {
    if (saved_[0] != 0)  // palette id: a configuration was loaded
      _tile_loadconfig(saved_);
    else
      _tile_release();
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  alignas(64) unsigned char saved_[64];
};

}  // namespace llmserve_amx
