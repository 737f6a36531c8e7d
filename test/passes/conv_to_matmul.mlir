// RUN: polyarch-opt %s -p conv-to-matmul | FileCheck %s
// RUN: polyarch-opt %s -p 'conv-to-matmul{convs=marked}' | FileCheck %s --check-prefix=MARKED
// RUN: not polyarch-opt %s -p 'conv-to-matmul{convs=some}' 2>&1 | FileCheck %s --check-prefix=BAD
// A 3x3, stride-2, padded convolution becomes pad, one strided slice per tap, the taps stacked
// after the channels, one matmul of the weights as [F, C*KH*KW] with them, and the bias; NCHW throughout.
// CHECK-LABEL: func.func @strided
// CHECK: %[[P:.*]] = torch.aten.constant_pad_nd %arg0, {{.*}} -> !torch.vtensor<[1,2,9,9],f32>
// CHECK: torch.aten.slice.Tensor %[[P]], {{.*}} -> !torch.vtensor<[1,2,4,9],f32>
// CHECK-COUNT-9: torch.aten.slice.Tensor {{.*}} -> !torch.vtensor<[1,2,4,4],f32>
// CHECK: %[[C:.*]] = torch.aten.cat {{.*}} -> !torch.vtensor<[1,2,9,4,4],f32>
// CHECK: %[[COL:.*]] = torch.aten.view %[[C]], {{.*}} -> !torch.vtensor<[1,18,16],f32>
// CHECK: %[[W2:.*]] = torch.aten.view %{{.*}}, {{.*}} -> !torch.vtensor<[3,18],f32>
// CHECK: %[[MM:.*]] = torch.aten.matmul %[[W2]], %[[COL]] : {{.*}} -> !torch.vtensor<[1,3,16],f32>
// CHECK: %[[V:.*]] = torch.aten.view %[[MM]], {{.*}} -> !torch.vtensor<[1,3,4,4],f32>
// CHECK: %[[Y:.*]] = torch.aten.add.Tensor %[[V]], {{.*}} -> !torch.vtensor<[1,3,4,4],f32>
// CHECK-NOT: torch.aten.permute
// CHECK-NOT: torch.aten.convolution
// CHECK: return %[[Y]]
// A depthwise convolution is a sum of its 9 taps, each a slice times its per-channel weight.
// CHECK-LABEL: func.func @depthwise
// CHECK-NOT: torch.aten.convolution
// CHECK-COUNT-9: torch.aten.mul.Tensor {{.*}} -> !torch.vtensor<[1,4,5,5],f32>
// CHECK-NOT: torch.aten.matmul
// CHECK: return
// A grouped convolution that is not depthwise stays.
// CHECK-LABEL: func.func @grouped
// CHECK: torch.aten.convolution
// CHECK-LABEL: func.func @marked

// convs=marked rewrites only what the tuner marked with polyarch.lowering = "im2col".
// MARKED-LABEL: func.func @strided
// MARKED: torch.aten.convolution
// MARKED-LABEL: func.func @marked
// MARKED-NOT: torch.aten.convolution
// MARKED: torch.aten.matmul {{.*}} -> !torch.vtensor<[1,3,25],f32>
// BAD: conv-to-matmul: convs='some'. Fix: use convs=all or convs=marked

func.func @strided(%x: !torch.vtensor<[1,2,7,7],f32>) -> !torch.vtensor<[1,3,4,4],f32> {
  %w = torch.vtensor.literal(dense<0.5> : tensor<3x2x3x3xf32>) : !torch.vtensor<[3,2,3,3],f32>
  %b = torch.vtensor.literal(dense<1.0> : tensor<3xf32>) : !torch.vtensor<[3],f32>
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int0 = torch.constant.int 0
  %false = torch.constant.bool false
  %stride = torch.prim.ListConstruct %int2, %int2 : (!torch.int, !torch.int) -> !torch.list<int>
  %pad = torch.prim.ListConstruct %int1, %int1 : (!torch.int, !torch.int) -> !torch.list<int>
  %dil = torch.prim.ListConstruct %int1, %int1 : (!torch.int, !torch.int) -> !torch.list<int>
  %opad = torch.prim.ListConstruct %int0, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %y = torch.aten.convolution %x, %w, %b, %stride, %pad, %dil, %false, %opad, %int1 : !torch.vtensor<[1,2,7,7],f32>, !torch.vtensor<[3,2,3,3],f32>, !torch.vtensor<[3],f32>, !torch.list<int>, !torch.list<int>, !torch.list<int>, !torch.bool, !torch.list<int>, !torch.int -> !torch.vtensor<[1,3,4,4],f32>
  return %y : !torch.vtensor<[1,3,4,4],f32>
}

func.func @depthwise(%x: !torch.vtensor<[1,4,5,5],f32>) -> !torch.vtensor<[1,4,5,5],f32> {
  %w = torch.vtensor.literal(dense<0.5> : tensor<4x1x3x3xf32>) : !torch.vtensor<[4,1,3,3],f32>
  %none = torch.constant.none
  %int1 = torch.constant.int 1
  %int4 = torch.constant.int 4
  %int0 = torch.constant.int 0
  %false = torch.constant.bool false
  %one = torch.prim.ListConstruct %int1, %int1 : (!torch.int, !torch.int) -> !torch.list<int>
  %zero = torch.prim.ListConstruct %int0, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %y = torch.aten.convolution %x, %w, %none, %one, %one, %one, %false, %zero, %int4 : !torch.vtensor<[1,4,5,5],f32>, !torch.vtensor<[4,1,3,3],f32>, !torch.none, !torch.list<int>, !torch.list<int>, !torch.list<int>, !torch.bool, !torch.list<int>, !torch.int -> !torch.vtensor<[1,4,5,5],f32>
  return %y : !torch.vtensor<[1,4,5,5],f32>
}

func.func @grouped(%x: !torch.vtensor<[1,4,5,5],f32>) -> !torch.vtensor<[1,4,5,5],f32> {
  %w = torch.vtensor.literal(dense<0.5> : tensor<4x2x3x3xf32>) : !torch.vtensor<[4,2,3,3],f32>
  %none = torch.constant.none
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int0 = torch.constant.int 0
  %false = torch.constant.bool false
  %one = torch.prim.ListConstruct %int1, %int1 : (!torch.int, !torch.int) -> !torch.list<int>
  %zero = torch.prim.ListConstruct %int0, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %y = torch.aten.convolution %x, %w, %none, %one, %one, %one, %false, %zero, %int2 : !torch.vtensor<[1,4,5,5],f32>, !torch.vtensor<[4,2,3,3],f32>, !torch.none, !torch.list<int>, !torch.list<int>, !torch.list<int>, !torch.bool, !torch.list<int>, !torch.int -> !torch.vtensor<[1,4,5,5],f32>
  return %y : !torch.vtensor<[1,4,5,5],f32>
}

func.func @marked(%x: !torch.vtensor<[1,2,5,5],f32>) -> !torch.vtensor<[1,3,5,5],f32> {
  %w = torch.vtensor.literal(dense<0.5> : tensor<3x2x1x1xf32>) : !torch.vtensor<[3,2,1,1],f32>
  %none = torch.constant.none
  %int1 = torch.constant.int 1
  %int0 = torch.constant.int 0
  %false = torch.constant.bool false
  %one = torch.prim.ListConstruct %int1, %int1 : (!torch.int, !torch.int) -> !torch.list<int>
  %zero = torch.prim.ListConstruct %int0, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %y = torch.aten.convolution %x, %w, %none, %one, %zero, %one, %false, %zero, %int1 {polyarch.lowering = "im2col"} : !torch.vtensor<[1,2,5,5],f32>, !torch.vtensor<[3,2,1,1],f32>, !torch.none, !torch.list<int>, !torch.list<int>, !torch.list<int>, !torch.bool, !torch.list<int>, !torch.int -> !torch.vtensor<[1,3,5,5],f32>
  return %y : !torch.vtensor<[1,3,5,5],f32>
}
