// Stand-in for the CUDA header of the same name in the host emulation (see emu.h).
#pragma once
#include "emu.h"
