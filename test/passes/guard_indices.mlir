// RUN: polyarch-opt %s -p 'guard-indices{stage=mark}' | FileCheck %s --check-prefix=MARK
// RUN: polyarch-opt %s -p guard-indices | FileCheck %s
// An input used as an index (through a view) gets its valid range on @main; an index
// computed from an input gets a check in front of its op; a constant index is left alone.
// MARK-LABEL: func.func @main
// MARK-SAME: polyarch.index_inputs = "{\220\22: {\22min\22: 0, \22max\22: 999, \22op\22: \22torch.aten.embedding\22}}"
// MARK: torch.aten.embedding %{{.*}}, %[[V:.*]], %{{.*}} -> !torch.vtensor<[16,4],f32>
// MARK: torch.aten.embedding {{.*}} {polyarch.index_guard = [array<i64: 1, -1, 0, 1000>]}
// MARK: torch.aten.index.Tensor_hacked_twin {{.*}} {polyarch.index_guard = [array<i64: 1, 0, -50, 50>]}
// MARK-NOT: polyarch.index_guard
// MARK: return

// CHECK-LABEL: func.func @main
// CHECK: %[[V:.*]] = torch.aten.view %arg0
// CHECK-NEXT: torch.aten.embedding %{{.*}}, %[[V]]
// CHECK: %[[I:.*]] = torch.aten.add.Scalar %arg0
// CHECK: %[[MIN:.*]] = torch.aten.min %[[I]] : !torch.vtensor<[2,8],si64> -> !torch.vtensor<[],si64>
// CHECK: %[[GE:.*]] = torch.aten.ge.Scalar %[[MIN]], %int0{{.*}} -> !torch.vtensor<[],i1>
// CHECK: %[[MAX:.*]] = torch.aten.max %[[I]] : !torch.vtensor<[2,8],si64> -> !torch.vtensor<[],si64>
// CHECK: %[[LT:.*]] = torch.aten.lt.Scalar %[[MAX]], %int1000{{.*}} -> !torch.vtensor<[],i1>
// CHECK: %[[OK:.*]] = torch.aten.logical_and %[[GE]], %[[LT]]
// CHECK: %[[B:.*]] = torch.aten.Bool.Tensor %[[OK]]
// CHECK: torch.runtime.assert %[[B]], "polyarch: an index computed in the model is out of range in torch.aten.embedding: valid indices are 0 to 999
// CHECK-NEXT: torch.aten.embedding %{{.*}}, %[[I]]
// CHECK-NOT: polyarch.index_guard
// CHECK: torch.aten.ge.Scalar %{{.*}}, %int-50
// CHECK: torch.runtime.assert
// CHECK-NEXT: torch.aten.index.Tensor_hacked_twin
// CHECK-NOT: torch.runtime.assert
// CHECK: return

func.func @main(%arg0: !torch.vtensor<[2,8],si64>, %arg1: !torch.vtensor<[5],si64>) -> (!torch.vtensor<[16,4],f32>, !torch.vtensor<[2,8,4],f32>, !torch.vtensor<[5,8],f32>, !torch.vtensor<[3,4],f32>) {
  %int-1 = torch.constant.int -1
  %int2 = torch.constant.int 2
  %int3 = torch.constant.int 3
  %int1 = torch.constant.int 1
  %false = torch.constant.bool false
  %w = torch.vtensor.literal(dense<1.0> : tensor<1000x4xf32>) : !torch.vtensor<[1000,4],f32>
  %t = torch.vtensor.literal(dense<1.0> : tensor<50x8xf32>) : !torch.vtensor<[50,8],f32>
  %k = torch.vtensor.literal(dense<[1, 2, 3]> : tensor<3xsi64>) : !torch.vtensor<[3],si64>
  %shape = torch.prim.ListConstruct %int-1 : (!torch.int) -> !torch.list<int>
  %v = torch.aten.view %arg0, %shape : !torch.vtensor<[2,8],si64>, !torch.list<int> -> !torch.vtensor<[16],si64>
  %e0 = torch.aten.embedding %w, %v, %int-1, %false, %false : !torch.vtensor<[1000,4],f32>, !torch.vtensor<[16],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[16,4],f32>
  %i = torch.aten.add.Scalar %arg0, %int3, %int1 : !torch.vtensor<[2,8],si64>, !torch.int, !torch.int -> !torch.vtensor<[2,8],si64>
  %e1 = torch.aten.embedding %w, %i, %int-1, %false, %false : !torch.vtensor<[1000,4],f32>, !torch.vtensor<[2,8],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[2,8,4],f32>
  %j = torch.aten.mul.Scalar %arg1, %int2 : !torch.vtensor<[5],si64>, !torch.int -> !torch.vtensor<[5],si64>
  %l = torch.prim.ListConstruct %j : (!torch.vtensor<[5],si64>) -> !torch.list<vtensor>
  %x = torch.aten.index.Tensor_hacked_twin %t, %l : !torch.vtensor<[50,8],f32>, !torch.list<vtensor> -> !torch.vtensor<[5,8],f32>
  %kk = torch.aten.mul.Scalar %k, %int2 : !torch.vtensor<[3],si64>, !torch.int -> !torch.vtensor<[3],si64>
  %e2 = torch.aten.embedding %w, %kk, %int-1, %false, %false : !torch.vtensor<[1000,4],f32>, !torch.vtensor<[3],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[3,4],f32>
  return %e0, %e1, %x, %e2 : !torch.vtensor<[16,4],f32>, !torch.vtensor<[2,8,4],f32>, !torch.vtensor<[5,8],f32>, !torch.vtensor<[3,4],f32>
}
