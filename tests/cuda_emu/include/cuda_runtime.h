// The runtime and the device side of the emulation (ftk_emu.h is force-included too).
#pragma once

#include "cuda_runtime_api.h"
#include "ftk_emu.h"
