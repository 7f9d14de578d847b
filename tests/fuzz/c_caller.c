/* Calls that only a C caller can make without undefined behaviour in the caller: an enum argument
 * holding any int (C allows it; in C++ a value outside the enum's range is undefined). */
#include <moe/moe.h>

const char *moe_fuzz_status_name_of_int(int v) { return moe_status_name((moe_status)v); }
