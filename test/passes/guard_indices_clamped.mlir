// RUN: polyarch-opt %s -p 'guard-indices{stage=mark}' | FileCheck %s --check-prefix=MARK
// RUN: polyarch-opt %s -p guard-indices | FileCheck %s
// A computed index clamped to constant bounds within the valid range needs no check (in range
// by construction: a check would read a flag back to the host mid-call); one clamped past the
// range, clamped on one side only, clamped as floats or cast to an integer type too narrow for
// its bounds (the cast wraps) is checked.
// MARK-LABEL: func.func @main
// MARK: torch.aten.index_put.hacked_twin %{{[0-9]+}}, %{{[0-9]+}}, %arg1, %false : !torch.vtensor<[50,8],f32>
// MARK: torch.aten.index_put.hacked_twin {{.*}} {polyarch.index_guard = [array<i64: 1, 0, -50, 50>]}
// MARK: torch.aten.index_put.hacked_twin {{.*}} {polyarch.index_guard = [array<i64: 1, 0, -50, 50>]}
// MARK: torch.aten.index.Tensor_hacked_twin {{.*}} {polyarch.index_guard = [array<i64: 1, 0, -50, 50>]}
// MARK: torch.aten.embedding {{.*}} {polyarch.index_guard = [array<i64: 1, -1, 0, 200>]}
// MARK: return

// CHECK-LABEL: func.func @main
// CHECK-NOT: torch.runtime.assert
// CHECK: %[[P0:.*]] = torch.aten.index_put.hacked_twin
// CHECK: torch.runtime.assert {{.*}} "polyarch: an index computed in the model is out of range in torch.aten.index_put.hacked_twin: valid indices are -50 to 49
// CHECK-NEXT: torch.aten.index_put.hacked_twin %[[P0]]
// CHECK: torch.runtime.assert
// CHECK-NEXT: torch.aten.index_put.hacked_twin
// CHECK: torch.runtime.assert
// CHECK-NEXT: torch.aten.index.Tensor_hacked_twin
// CHECK: torch.runtime.assert
// CHECK-NEXT: torch.aten.embedding
// CHECK: return

func.func @main(%arg0: !torch.vtensor<[4],si64>, %arg1: !torch.vtensor<[4,8],f32>, %arg2: !torch.vtensor<[4],f32>) -> (!torch.vtensor<[50,8],f32>, !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,4],f32>) {
  %none = torch.constant.none
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int3 = torch.constant.int 3
  %int4 = torch.constant.int 4
  %int49 = torch.constant.int 49
  %int50 = torch.constant.int 50
  %false = torch.constant.bool false
  %t = torch.vtensor.literal(dense<1.0> : tensor<50x8xf32>) : !torch.vtensor<[50,8],f32>
  %at = torch.aten.add.Scalar %arg0, %int3, %int1 : !torch.vtensor<[4],si64>, !torch.int, !torch.int -> !torch.vtensor<[4],si64>
  // clamped to [0, 49], seen through a view: no check
  %c = torch.aten.clamp %at, %int0, %int49 : !torch.vtensor<[4],si64>, !torch.int, !torch.int -> !torch.vtensor<[4],si64>
  %shape = torch.prim.ListConstruct %int4 : (!torch.int) -> !torch.list<int>
  %cv = torch.aten.view %c, %shape : !torch.vtensor<[4],si64>, !torch.list<int> -> !torch.vtensor<[4],si64>
  %l0 = torch.prim.ListConstruct %cv : (!torch.vtensor<[4],si64>) -> !torch.list<vtensor>
  %p0 = torch.aten.index_put.hacked_twin %t, %l0, %arg1, %false : !torch.vtensor<[50,8],f32>, !torch.list<vtensor>, !torch.vtensor<[4,8],f32>, !torch.bool -> !torch.vtensor<[50,8],f32>
  // clamped to [0, 50]: 50 is past the range
  %d = torch.aten.clamp %at, %int0, %int50 : !torch.vtensor<[4],si64>, !torch.int, !torch.int -> !torch.vtensor<[4],si64>
  %l1 = torch.prim.ListConstruct %d : (!torch.vtensor<[4],si64>) -> !torch.list<vtensor>
  %p1 = torch.aten.index_put.hacked_twin %p0, %l1, %arg1, %false : !torch.vtensor<[50,8],f32>, !torch.list<vtensor>, !torch.vtensor<[4,8],f32>, !torch.bool -> !torch.vtensor<[50,8],f32>
  // clamped above only: a negative value can pass -50
  %e = torch.aten.clamp %at, %none, %int49 : !torch.vtensor<[4],si64>, !torch.none, !torch.int -> !torch.vtensor<[4],si64>
  %l2 = torch.prim.ListConstruct %e : (!torch.vtensor<[4],si64>) -> !torch.list<vtensor>
  %p2 = torch.aten.index_put.hacked_twin %p1, %l2, %arg1, %false : !torch.vtensor<[50,8],f32>, !torch.list<vtensor>, !torch.vtensor<[4,8],f32>, !torch.bool -> !torch.vtensor<[50,8],f32>
  // clamped as floats, then cast: NaN casts anywhere
  %f = torch.aten.clamp %arg2, %int0, %int49 : !torch.vtensor<[4],f32>, !torch.int, !torch.int -> !torch.vtensor<[4],f32>
  %int4_ = torch.constant.int 4
  %fi = torch.aten.to.dtype %f, %int4_, %false, %false, %none : !torch.vtensor<[4],f32>, !torch.int, !torch.bool, !torch.bool, !torch.none -> !torch.vtensor<[4],si64>
  %l3 = torch.prim.ListConstruct %fi : (!torch.vtensor<[4],si64>) -> !torch.list<vtensor>
  %x = torch.aten.index.Tensor_hacked_twin %p2, %l3 : !torch.vtensor<[50,8],f32>, !torch.list<vtensor> -> !torch.vtensor<[4,8],f32>
  // clamped to [0, 199], then cast to si8: 128..199 wrap negative
  %int1_ = torch.constant.int 1
  %int199 = torch.constant.int 199
  %intm1 = torch.constant.int -1
  %w = torch.vtensor.literal(dense<1.0> : tensor<200x4xf32>) : !torch.vtensor<[200,4],f32>
  %g = torch.aten.clamp %at, %int0, %int199 : !torch.vtensor<[4],si64>, !torch.int, !torch.int -> !torch.vtensor<[4],si64>
  %g8 = torch.aten.to.dtype %g, %int1_, %false, %false, %none : !torch.vtensor<[4],si64>, !torch.int, !torch.bool, !torch.bool, !torch.none -> !torch.vtensor<[4],si8>
  %e8 = torch.aten.embedding %w, %g8, %intm1, %false, %false : !torch.vtensor<[200,4],f32>, !torch.vtensor<[4],si8>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[4,4],f32>
  return %p2, %x, %e8 : !torch.vtensor<[50,8],f32>, !torch.vtensor<[4,8],f32>, !torch.vtensor<[4,4],f32>
}
