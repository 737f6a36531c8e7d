// RUN: polyarch-opt %s -p pool-to-mean | FileCheck %s
// An average pool whose one window covers the whole input (transformers' EfficientNet:
// AvgPool2d(1280, ceil_mode=True) on 7x7, which IREE 3.13 refuses) becomes a mean over H, W.
// CHECK-LABEL: func.func @whole
// CHECK-NOT: torch.aten.avg_pool2d
// CHECK: %[[M:.*]] = torch.aten.mean.dim %arg0, %{{.*}}, %true{{.*}}, %none{{.*}} -> !torch.vtensor<[1,8,1,1],f32>
// CHECK: return %[[M]]
// A pool with several windows stays.
// CHECK-LABEL: func.func @windows
// CHECK: torch.aten.avg_pool2d

func.func @whole(%x: !torch.vtensor<[1,8,7,7],f32>) -> !torch.vtensor<[1,8,1,1],f32> {
  %int1280 = torch.constant.int 1280
  %int0 = torch.constant.int 0
  %true = torch.constant.bool true
  %false = torch.constant.bool false
  %none = torch.constant.none
  %k = torch.prim.ListConstruct %int1280, %int1280 : (!torch.int, !torch.int) -> !torch.list<int>
  %p = torch.prim.ListConstruct %int0, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %y = torch.aten.avg_pool2d %x, %k, %k, %p, %true, %true, %none : !torch.vtensor<[1,8,7,7],f32>, !torch.list<int>, !torch.list<int>, !torch.list<int>, !torch.bool, !torch.bool, !torch.none -> !torch.vtensor<[1,8,1,1],f32>
  return %y : !torch.vtensor<[1,8,1,1],f32>
}

func.func @windows(%x: !torch.vtensor<[1,8,8,8],f32>) -> !torch.vtensor<[1,8,4,4],f32> {
  %int2 = torch.constant.int 2
  %int0 = torch.constant.int 0
  %false = torch.constant.bool false
  %none = torch.constant.none
  %k = torch.prim.ListConstruct %int2, %int2 : (!torch.int, !torch.int) -> !torch.list<int>
  %p = torch.prim.ListConstruct %int0, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %y = torch.aten.avg_pool2d %x, %k, %k, %p, %false, %false, %none : !torch.vtensor<[1,8,8,8],f32>, !torch.list<int>, !torch.list<int>, !torch.list<int>, !torch.bool, !torch.bool, !torch.none -> !torch.vtensor<[1,8,4,4],f32>
  return %y : !torch.vtensor<[1,8,4,4],f32>
}
