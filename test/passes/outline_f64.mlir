// RUN: polyarch-opt %s -p outline-segments | FileCheck %s
// An f64 tensor crossing segments travels as f32 on every device (IREE demotes f64
// inside a function but sizes an f64 result wrongly at the boundary).

// CHECK-LABEL: func.func @seg_0(%arg0: !torch.vtensor<[4,8],f32>) -> !torch.vtensor<[4,8],f32> attributes {polyarch.device = "cpu"
// CHECK: %[[D:.*]] = torch.aten.mul.Tensor {{.*}} -> !torch.vtensor<[4,8],f64>
// CHECK: %[[N:.*]] = torch.aten.to.dtype %[[D]], {{.*}} -> !torch.vtensor<[4,8],f32>
// CHECK: return %[[N]]
// CHECK-LABEL: func.func @seg_1(%arg0: !torch.vtensor<[4,8],f32>) -> !torch.vtensor<[4,8],f32> attributes {polyarch.device = "cpu:1"
// CHECK: %[[W:.*]] = torch.aten.to.dtype %arg0, {{.*}} -> !torch.vtensor<[4,8],f64>
// CHECK: torch.aten.sum.dim_IntList %[[W]]
// CHECK-LABEL: func.func @main
// CHECK: "polyarch.transfer"(%{{.*}}) {from = "cpu", to = "cpu:1"} : (!torch.vtensor<[4,8],f32>) -> !torch.vtensor<[4,8],f32>

func.func @main(%x: !torch.vtensor<[4,8],f32>) -> !torch.vtensor<[4,8],f32> {
  %int7 = torch.constant.int 7
  %int6 = torch.constant.int 6
  %int1 = torch.constant.int 1
  %true = torch.constant.bool true
  %false = torch.constant.bool false
  %none = torch.constant.none
  %d = torch.aten.to.dtype %x, %int7, %false, %false, %none {polyarch.device = "cpu", polyarch.time_us = {cpu = 1.0 : f64}} : !torch.vtensor<[4,8],f32>, !torch.int, !torch.bool, !torch.bool, !torch.none -> !torch.vtensor<[4,8],f64>
  %m = torch.aten.mul.Tensor %d, %d {polyarch.device = "cpu", polyarch.time_us = {cpu = 1.0 : f64}} : !torch.vtensor<[4,8],f64>, !torch.vtensor<[4,8],f64> -> !torch.vtensor<[4,8],f64>
  %dims = torch.prim.ListConstruct %int1 : (!torch.int) -> !torch.list<int>
  %s = torch.aten.sum.dim_IntList %m, %dims, %true, %none {polyarch.device = "cpu:1", polyarch.time_us = {"cpu:1" = 1.0 : f64}} : !torch.vtensor<[4,8],f64>, !torch.list<int>, !torch.bool, !torch.none -> !torch.vtensor<[4,1],f64>
  %b = torch.aten.sub.Tensor %m, %s, %int1 {polyarch.device = "cpu:1", polyarch.time_us = {"cpu:1" = 1.0 : f64}} : !torch.vtensor<[4,8],f64>, !torch.vtensor<[4,1],f64>, !torch.int -> !torch.vtensor<[4,8],f64>
  %r = torch.aten.to.dtype %b, %int6, %false, %false, %none {polyarch.device = "cpu:1", polyarch.time_us = {"cpu:1" = 1.0 : f64}} : !torch.vtensor<[4,8],f64>, !torch.int, !torch.bool, !torch.bool, !torch.none -> !torch.vtensor<[4,8],f32>
  return %r : !torch.vtensor<[4,8],f32>
}
