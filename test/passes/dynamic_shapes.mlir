// RUN: polyarch-opt %s -p annotate-costs | FileCheck %s --check-prefix=COST
// RUN: polyarch-opt %s -p 'annotate-costs{devices=cpu,vulkan},assign-devices{devices=cpu,vulkan pin=l1=cpu pin=l2=vulkan},outline-segments' | FileCheck %s

// Dynamic dims (?) are costed at their example sizes (polyarch.shapes / polyarch.arg_shapes,
// recorded by the importer), not as 1: mm ?x64 @ 64x32 at 24 rows, ?x = 4 x 6.
// COST: torch.aten.mm {{.*}}polyarch.cost = {bytes_read = 14336 : i64, bytes_written = 3072 : i64, flops = 98304 : i64}
// COST: torch.aten.relu {{.*}}polyarch.cost = {bytes_read = 3072 : i64, bytes_written = 3072 : i64, flops = 768 : i64}

// Segments keep the dims dynamic at their boundaries; the example sizes go with the
// segment's arguments, the calls and the transfers. The size query (glue) reads a result
// of its own segment, so it is cloned after the op that makes it (program order).
// CHECK-LABEL: func.func @seg_0(%arg0: !torch.vtensor<[?,64],f32>) -> !torch.vtensor<[?,32],f32>
// CHECK-SAME: polyarch.arg_shapes = [array<i64: 24, 64>]
// CHECK: torch.aten.mm
// CHECK-LABEL: func.func @seg_1(%arg0: !torch.vtensor<[?,32],f32>) -> !torch.vtensor<[?,6,32],f32>
// CHECK-SAME: polyarch.arg_shapes = [array<i64: 24, 32>]
// CHECK: %[[R:.*]] = torch.aten.relu %arg0
// CHECK: torch.aten.size.int %[[R]]
// CHECK: torch.aten.view %[[R]]
// CHECK-LABEL: func.func @main
// CHECK: %[[C:.*]] = call @seg_0(%arg0) {polyarch.shapes = [array<i64: 24, 32>]}
// CHECK: %[[T:.*]] = "polyarch.transfer"(%[[C]]) {from = "cpu", polyarch.shapes = [array<i64: 24, 32>], to = "vulkan"}
// CHECK: call @seg_1(%[[T]]) {polyarch.shapes = [array<i64: 4, 6, 32>]} : (!torch.vtensor<[?,32],f32>) -> !torch.vtensor<[?,6,32],f32>

func.func @main(%x: !torch.vtensor<[?,64],f32>) -> !torch.vtensor<[?,6,32],f32> attributes {polyarch.arg_shapes = [array<i64: 24, 64>]} {
  %w = torch.vtensor.literal(dense<1.0> : tensor<64x32xf32>) : !torch.vtensor<[64,32],f32>
  %int0 = torch.constant.int 0
  %int6 = torch.constant.int 6
  %int32 = torch.constant.int 32
  %0 = torch.aten.mm %x, %w {polyarch.shapes = [array<i64: 24, 32>]} : !torch.vtensor<[?,64],f32>, !torch.vtensor<[64,32],f32> -> !torch.vtensor<[?,32],f32> loc(#l1)
  %1 = torch.aten.relu %0 {polyarch.shapes = [array<i64: 24, 32>]} : !torch.vtensor<[?,32],f32> -> !torch.vtensor<[?,32],f32> loc(#l2)
  %rows = torch.aten.size.int %1, %int0 : !torch.vtensor<[?,32],f32>, !torch.int -> !torch.int
  %b = torch.aten.floordiv.int %rows, %int6 : !torch.int, !torch.int -> !torch.int
  %shape = torch.prim.ListConstruct %b, %int6, %int32 : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %2 = torch.aten.view %1, %shape {polyarch.shapes = [array<i64: 4, 6, 32>]} : !torch.vtensor<[?,32],f32>, !torch.list<int> -> !torch.vtensor<[?,6,32],f32> loc(#l2)
  return %2 : !torch.vtensor<[?,6,32],f32>
}
#l1 = loc("l1"("model.py":1:1))
#l2 = loc("l2"("model.py":2:1))
