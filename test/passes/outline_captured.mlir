// RUN: polyarch-opt %s -p outline-segments | FileCheck %s
// A loop whose body reads values from outside it (torch.prim.Loop, as STFT imports): the
// segment takes them as arguments or clones their glue, and the body reads the segment's
// copies (it pointed into @main before, and crashed once @main's ops were erased).
// Two outputs computed from constants alone get a segment of their own on the cpu.

// CHECK-LABEL: func.func @seg_0(%arg0: !torch.vtensor<[4],f32>, %arg1: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
// CHECK: %[[TWO:.*]] = torch.constant.int 2
// CHECK: torch.prim.Loop
// CHECK: ^bb0(%{{.*}}: !torch.int, %[[ACC:.*]]: !torch.vtensor<[4],f32>):
// CHECK: torch.aten.add.Tensor %[[ACC]], %arg1, %[[TWO]]
// CHECK-LABEL: func.func @seg_1() -> !torch.vtensor<[3],si64> attributes {polyarch.device = "cpu"
// CHECK: torch.aten.arange
// CHECK-LABEL: func.func @main
// CHECK: %[[A:.*]] = call @seg_0(%arg0, %arg1)
// CHECK: %[[C:.*]] = call @seg_1()
// CHECK: return %[[A]], %[[C]]

module attributes {polyarch.devices = ["cpu", "vulkan"]} {
func.func @main(%x: !torch.vtensor<[4],f32>, %y: !torch.vtensor<[4],f32>) -> (!torch.vtensor<[4],f32>, !torch.vtensor<[3],si64>) {
  %int2 = torch.constant.int 2
  %int3 = torch.constant.int 3
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %none = torch.constant.none
  %true = torch.constant.bool true
  %r = torch.prim.Loop %int3, %true, init(%x) {
  ^bb0(%i: !torch.int, %acc: !torch.vtensor<[4],f32>):
    %s = torch.aten.add.Tensor %acc, %y, %int2 : !torch.vtensor<[4],f32>, !torch.vtensor<[4],f32>, !torch.int -> !torch.vtensor<[4],f32>
    torch.prim.Loop.condition %true, iter(%s : !torch.vtensor<[4],f32>)
  } {polyarch.device = "vulkan", polyarch.time_us = {cpu = 1.0 : f64, vulkan = 1.0 : f64}} : (!torch.int, !torch.bool, !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
  %c = torch.aten.arange.start_step %int0, %int3, %int1, %none, %none, %none, %none : !torch.int, !torch.int, !torch.int, !torch.none, !torch.none, !torch.none, !torch.none -> !torch.vtensor<[3],si64>
  return %r, %c : !torch.vtensor<[4],f32>, !torch.vtensor<[3],si64>
}
}
