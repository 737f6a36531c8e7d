// What was measured on a device (compiler/grounding.py writes it) steers placement.
// An op kind measured wrong on Vulkan never goes there, and says why:
// RUN: polyarch-opt %S/assign_devices.mlir -p 'annotate-costs,assign-devices{devices=cpu,vulkan verdicts=%S/Inputs/mm_wrong_on_vulkan.json}' | FileCheck %s --check-prefix=WRONG
// Pinned there anyway, it is an error naming the measurement:
// RUN: not polyarch-opt %S/assign_devices.mlir -p 'annotate-costs,assign-devices{devices=cpu,vulkan pin=body=vulkan verdicts=%S/Inputs/mm_wrong_on_vulkan.json}' 2>&1 | FileCheck %s --check-prefix=PINNED
// Measured corrections scale the predicted times of an op class on a device: matmuls 1000x
// slower than the profile says on Vulkan stay on the CPU (the same without verdicts: assign_devices.mlir).
// RUN: polyarch-opt %S/assign_devices.mlir -p 'annotate-costs{devices=cpu,vulkan verdicts=%S/Inputs/slow_vulkan_matmul.json},assign-devices{devices=cpu,vulkan}' | FileCheck %s --check-prefix=SLOW
// RUN: polyarch-opt %S/assign_devices.mlir -p 'assign-devices{devices=cpu,vulkan verdicts=%S/Inputs/slow_vulkan_matmul.json}' | FileCheck %s --check-prefix=SLOW
// RUN: not polyarch-opt %S/assign_devices.mlir -p 'assign-devices{devices=cpu,vulkan verdicts=%S/Inputs/missing.json}' 2>&1 | FileCheck %s --check-prefix=MISSING

// WRONG: torch.aten.mm {{.*}}polyarch.device = "cpu", polyarch.reason = "vulkan cannot run it: measured wrong on vulkan (test device): max error 0.9 of max output against llvm-cpu"
// WRONG: torch.aten.mm {{.*}}polyarch.device = "cpu", polyarch.reason = "vulkan cannot run it: measured wrong on vulkan
// PINNED: torch.aten.mm (body.layer) at model.py:4 is pinned to vulkan, which cannot run it (vulkan cannot run it: measured wrong on vulkan
// SLOW: torch.aten.mm {{.*}}polyarch.device = "cpu"
// SLOW: torch.aten.mm {{.*}}polyarch.device = "cpu"
// MISSING: cannot read verdicts file {{.*}}missing.json
