/* A stand-in for the CUDA driver (built as libcuda.so.1 in a folder of its own, loaded only by
 * moe_test_device_pointers): cuPointerGetAttribute says that the range a test marks is device
 * memory, or managed memory, and fails for every other address, as the driver does for host
 * memory it does not know. */
#include <stddef.h>
#include <stdint.h>

enum { kMemoryType = 2, kIsManaged = 8, kDeviceMemory = 2, kInvalidValue = 1 };

static uintptr_t marked_begin, marked_end;
static int marked_managed;

void fake_driver_mark(const void *p, size_t bytes, int managed) {
  marked_begin = (uintptr_t)p;
  marked_end = marked_begin + bytes;
  marked_managed = managed;
}

int cuPointerGetAttribute(void *value, int attribute, unsigned long long ptr) {
  if (ptr < marked_begin || ptr >= marked_end) return kInvalidValue;
  if (attribute == kMemoryType) {
    *(unsigned int *)value = kDeviceMemory;
    return 0;
  }
  if (attribute == kIsManaged) {
    *(unsigned int *)value = (unsigned int)marked_managed;
    return 0;
  }
  return kInvalidValue;
}
