// RUN: polyarch-opt %s -p 'guard-indices{stage=mark}' | FileCheck %s --check-prefix=MARK
// RUN: polyarch-opt %s -p guard-indices | FileCheck %s
// Indices into a dimension of dynamic size: an input index into an input table is recorded
// for the runtime (`sized`: the table's size at call time); a computed index and a constant
// index are checked in the segment against `torch.aten.size.int` of the table.
// MARK-LABEL: func.func @main
// MARK-SAME: polyarch.index_inputs = "{\221\22: {\22op\22: \22torch.aten.index_select\22, \22sized\22: [{\22input\22: 0, \22dim\22: 0, \22negative\22: false, \22op\22: \22torch.aten.index_select\22}]}}"
// MARK: torch.aten.index_select %arg0, %int0, %arg1 :
// MARK: torch.aten.index_select {{.*}} {polyarch.index_guard = [array<i64: 2, -1, 0, 0, 0>]}
// MARK: torch.aten.index.Tensor_hacked_twin {{.*}} {polyarch.index_guard = [array<i64: 1, 0, 1, 0, 0>]}
// MARK: return

// CHECK-LABEL: func.func @main
// CHECK: torch.aten.index_select %arg0, %int0, %arg1 :
// CHECK: %[[I:.*]] = torch.aten.add.Scalar %arg1
// CHECK: %[[N:.*]] = torch.aten.size.int %arg0, %{{.*}} : !torch.vtensor<[?,4],f32>, !torch.int -> !torch.int
// CHECK: %[[MIN:.*]] = torch.aten.min %[[I]]
// CHECK: torch.aten.ge.Scalar %[[MIN]], %{{.*}}
// CHECK: %[[MAX:.*]] = torch.aten.max %[[I]]
// CHECK: torch.aten.lt.Scalar %[[MAX]], %[[N]]
// CHECK: torch.runtime.assert %{{.*}}, "polyarch: an index computed in the model is out of range in torch.aten.index_select: valid indices are 0 to size - 1 of dimension 0
// CHECK-NEXT: torch.aten.index_select %arg0, %int0, %[[I]]
// CHECK: %[[M:.*]] = torch.aten.size.int %arg0
// CHECK: %[[NEG:.*]] = torch.aten.neg.int %[[M]]
// CHECK: torch.aten.ge.Scalar %{{.*}}, %[[NEG]]
// CHECK: torch.aten.lt.Scalar %{{.*}}, %[[M]]
// CHECK: torch.runtime.assert
// CHECK-NEXT: torch.aten.index.Tensor_hacked_twin
// CHECK-NOT: polyarch.index_guard
// CHECK: return

func.func @main(%arg0: !torch.vtensor<[?,4],f32>, %arg1: !torch.vtensor<[3],si64>) -> (!torch.vtensor<[3,4],f32>, !torch.vtensor<[3,4],f32>, !torch.vtensor<[1,4],f32>) {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %k = torch.vtensor.literal(dense<[2]> : tensor<1xsi64>) : !torch.vtensor<[1],si64>
  %a = torch.aten.index_select %arg0, %int0, %arg1 : !torch.vtensor<[?,4],f32>, !torch.int, !torch.vtensor<[3],si64> -> !torch.vtensor<[3,4],f32>
  %i = torch.aten.add.Scalar %arg1, %int1, %int1 : !torch.vtensor<[3],si64>, !torch.int, !torch.int -> !torch.vtensor<[3],si64>
  %b = torch.aten.index_select %arg0, %int0, %i : !torch.vtensor<[?,4],f32>, !torch.int, !torch.vtensor<[3],si64> -> !torch.vtensor<[3,4],f32>
  %l = torch.prim.ListConstruct %k : (!torch.vtensor<[1],si64>) -> !torch.list<vtensor>
  %c = torch.aten.index.Tensor_hacked_twin %arg0, %l : !torch.vtensor<[?,4],f32>, !torch.list<vtensor> -> !torch.vtensor<[1,4],f32>
  return %a, %b, %c : !torch.vtensor<[3,4],f32>, !torch.vtensor<[3,4],f32>, !torch.vtensor<[1,4],f32>
}
