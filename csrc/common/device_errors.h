// Sync-free input validation on CUDA: kernels record what they find wrong in a small host-mapped
// record per device (kernels/common.cuh: DeviceError), and the host raises it later, without ever
// waiting for the GPU on the good path. A record is raised by the next moe_infer CUDA op on that
// device that validates (once the kernel that wrote it has run), or by check_device_errors().
#pragma once

#include <c10/core/Device.h>

namespace moe_infer {

namespace kernels {
struct DeviceError;
}

// The device's error record for a kernel to write (allocated on first use), or nullptr while the
// current stream is being captured before the record exists (the kernels stay memory-safe).
kernels::DeviceError* device_error_record(c10::DeviceIndex device);

// Raises the device's recorded error, if any, and clears it. `synchronize` first waits for the
// device's work, so errors of every kernel issued so far are seen.
void raise_device_error(c10::DeviceIndex device, bool synchronize);

}  // namespace moe_infer
