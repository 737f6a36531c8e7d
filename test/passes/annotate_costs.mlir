// RUN: polyarch-opt %s -p annotate-costs | FileCheck %s
// RUN: polyarch-opt %s -p 'annotate-costs{devices=cpu,vulkan profile=%S/Inputs/slow_cpu.json}' | FileCheck %s --check-prefix=TIME
// RUN: not polyarch-opt %s -p 'annotate-costs{devices=cpu profile=%S/Inputs/missing.json}' 2>&1 | FileCheck %s --check-prefix=MISSING

// Without devices there are no times; with them, a roofline per device from the profiles
// (cpu: the given file, 1 GFLOP/s and 1 GB/s; vulkan: the built-in iGPU profile).
// CHECK-NOT: polyarch.time_us
// TIME: module attributes {polyarch.profiles = {cpu = "round-numbers-cpu", vulkan = "vulkan-igpu-radeon-780m"}}
// mm: max(32768 flop / 1e9, 11264 B / 1e9) + 1 dispatch x 1 us = 33.768 us on cpu.
// TIME: torch.aten.mm {{.*}}polyarch.time_us = {cpu = 3.376800e+01 : f64, vulkan = {{[0-9.e+-]+}} : f64}
// Elementwise ops fuse into a neighbour's dispatch: no launch overhead. 3072 B / 1e9 = 3.072 us.
// TIME: torch.aten.add.Tensor {{.*}}polyarch.time_us = {cpu = 3.072000e+00 : f64
// MISSING: profile file not found: {{.*}}missing.json. Fix: write one with `polyarch calibrate -o FILE`

// CHECK-LABEL: func.func @main
func.func @main(%x: !torch.vtensor<[8,64],f32>, %ids: !torch.vtensor<[4,16],si64>) -> (!torch.vtensor<[8,32],f32>, !torch.vtensor<[4,16,32],f32>, !torch.vtensor<[8],f32>) {
  %w = torch.vtensor.literal(dense<1.0> : tensor<64x32xf32>) : !torch.vtensor<[64,32],f32>
  %table = torch.vtensor.literal(dense<1.0> : tensor<100x32xf32>) : !torch.vtensor<[100,32],f32>
  %int1 = torch.constant.int 1
  %int-1 = torch.constant.int -1
  %false = torch.constant.bool false
  %none = torch.constant.none
  // Constants are not annotated.
  // CHECK: torch.vtensor.literal
  // CHECK-NOT: polyarch.cost
  // CHECK-SAME: !torch.vtensor<[64,32],f32>
  // mm 8x64 @ 64x32: 2*8*32*64 flops; reads 8*64*4 + 64*32*4 bytes, writes 8*32*4.
  // CHECK: torch.aten.mm {{.*}}polyarch.cost = {bytes_read = 10240 : i64, bytes_written = 1024 : i64, flops = 32768 : i64}
  %0 = torch.aten.mm %x, %w : !torch.vtensor<[8,64],f32>, !torch.vtensor<[64,32],f32> -> !torch.vtensor<[8,32],f32>
  // Elementwise: one flop per output element.
  // CHECK: torch.aten.add.Tensor {{.*}}polyarch.cost = {bytes_read = 2048 : i64, bytes_written = 1024 : i64, flops = 256 : i64}
  %1 = torch.aten.add.Tensor %0, %0, %int1 : !torch.vtensor<[8,32],f32>, !torch.vtensor<[8,32],f32>, !torch.int -> !torch.vtensor<[8,32],f32>
  // Transcendental: four flops per output element.
  // CHECK: torch.aten.exp {{.*}}flops = 1024 : i64
  %2 = torch.aten.exp %1 : !torch.vtensor<[8,32],f32> -> !torch.vtensor<[8,32],f32>
  // Embedding reads the indices and the gathered rows, not the whole table.
  // CHECK: torch.aten.embedding {{.*}}polyarch.cost = {bytes_read = 8704 : i64, bytes_written = 8192 : i64, flops = 0 : i64}
  %3 = torch.aten.embedding %table, %ids, %int-1, %false, %false : !torch.vtensor<[100,32],f32>, !torch.vtensor<[4,16],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[4,16,32],f32>
  // Reduction: one flop per input element.
  %dims = torch.prim.ListConstruct %int1 : (!torch.int) -> !torch.list<int>
  // CHECK: torch.aten.sum.dim_IntList {{.*}}flops = 512 : i64
  %4 = torch.aten.sum.dim_IntList %x, %dims, %false, %none : !torch.vtensor<[8,64],f32>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[8],f32>
  // Views are free.
  return %2, %3, %4 : !torch.vtensor<[8,32],f32>, !torch.vtensor<[4,16,32],f32>, !torch.vtensor<[8],f32>
}
