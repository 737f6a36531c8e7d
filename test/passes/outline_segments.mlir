// RUN: polyarch-opt %s -p outline-segments | FileCheck %s
// Placement is given (as assign-devices would write it); outline cuts at device changes.

// Segment 0 on cpu: the i64 gather; the weight table is rematerialised inside.
// CHECK-LABEL: func.func @seg_0(%arg0: !torch.vtensor<[4,8],si64>) -> !torch.vtensor<[4,8,16],f32> attributes {polyarch.device = "cpu", polyarch.time_us = 1.500000e+00 : f64}
// CHECK: torch.vtensor.literal(dense<1.000000e+00> : tensor<10x16xf32>)
// CHECK: torch.aten.embedding
// CHECK: return
// Segment 1 on vulkan: its bool output travels widened to si32 (32-bit storage only).
// CHECK-LABEL: func.func @seg_1(%arg0: !torch.vtensor<[4,8,16],f32>) -> (!torch.vtensor<[4,8,16],f32>, !torch.vtensor<[4,8,16],si32>) attributes {polyarch.device = "vulkan"
// The constant %int1 is cloned here too, not passed between segments.
// CHECK: torch.constant.int 1
// CHECK: torch.aten.add.Tensor
// CHECK: torch.aten.gt.Scalar
// CHECK: %[[W:.*]] = torch.aten.to.dtype %{{.*}} : !torch.vtensor<[4,8,16],i1>, !torch.int, !torch.bool, !torch.bool, !torch.none -> !torch.vtensor<[4,8,16],si32>
// CHECK: return %{{.*}}, %[[W]]
// Segment 2 back on cpu.
// CHECK-LABEL: func.func @seg_2
// CHECK-SAME: polyarch.device = "cpu"
// CHECK: torch.aten.where.self
// @main: calls and transfers only.
// CHECK-LABEL: func.func @main(%arg0: !torch.vtensor<[4,8],si64>)
// CHECK-NEXT: %[[A:.*]] = call @seg_0(%arg0)
// CHECK-NEXT: %[[T:.*]] = "polyarch.transfer"(%[[A]]) {from = "cpu", to = "vulkan"}
// CHECK-NEXT: %[[B:.*]]:2 = call @seg_1(%[[T]])
// The widened bool comes back narrowed for the cpu segment.
// CHECK-NEXT: %[[T1:.*]] = "polyarch.transfer"(%[[B]]#1) {from = "vulkan", to = "cpu"} : (!torch.vtensor<[4,8,16],si32>) -> !torch.vtensor<[4,8,16],i1>
// CHECK-NEXT: %[[T0:.*]] = "polyarch.transfer"(%[[B]]#0) {from = "vulkan", to = "cpu"}
// seg_0's result stays on cpu: no transfer.
// CHECK-NEXT: %[[C:.*]] = call @seg_2(%[[T1]], %[[T0]], %[[A]])
// CHECK-NEXT: return %[[C]]

func.func @main(%ids: !torch.vtensor<[4,8],si64>) -> !torch.vtensor<[4,8,16],f32> {
  %table = torch.vtensor.literal(dense<1.0> : tensor<10x16xf32>) : !torch.vtensor<[10,16],f32>
  %int-1 = torch.constant.int -1
  %int1 = torch.constant.int 1
  %false = torch.constant.bool false
  %float0 = torch.constant.float 0.0
  %e = torch.aten.embedding %table, %ids, %int-1, %false, %false {polyarch.device = "cpu", polyarch.time_us = {cpu = 1.5 : f64}} : !torch.vtensor<[10,16],f32>, !torch.vtensor<[4,8],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[4,8,16],f32>
  %a = torch.aten.add.Tensor %e, %e, %int1 {polyarch.device = "vulkan", polyarch.time_us = {cpu = 2.0 : f64, vulkan = 1.0 : f64}} : !torch.vtensor<[4,8,16],f32>, !torch.vtensor<[4,8,16],f32>, !torch.int -> !torch.vtensor<[4,8,16],f32>
  %g = torch.aten.gt.Scalar %a, %int1 {polyarch.device = "vulkan", polyarch.time_us = {cpu = 2.0 : f64, vulkan = 1.0 : f64}} : !torch.vtensor<[4,8,16],f32>, !torch.int -> !torch.vtensor<[4,8,16],i1>
  %w = torch.aten.where.self %g, %a, %e {polyarch.device = "cpu", polyarch.time_us = {cpu = 2.0 : f64}} : !torch.vtensor<[4,8,16],i1>, !torch.vtensor<[4,8,16],f32>, !torch.vtensor<[4,8,16],f32> -> !torch.vtensor<[4,8,16],f32>
  return %w : !torch.vtensor<[4,8,16],f32>
}

// RUN: not polyarch-opt %S/assign_devices.mlir -p outline-segments 2>&1 | FileCheck %s --check-prefix=NOPLACE
// NOPLACE: has no polyarch.device. Fix: run assign-devices before outline-segments
