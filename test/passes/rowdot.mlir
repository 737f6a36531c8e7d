// RUN: polyarch-opt %s -p rowdot | FileCheck %s
// RUN: polyarch-opt %s -p 'rowdot{group=false}' | FileCheck %s --check-prefix=ALONE
// RUN: polyarch-opt %s -p 'rowdot{batched=false}' | FileCheck %s --check-prefix=UNBATCHED
// RUN: polyarch-opt %s -p 'rowdot{values=false}' | FileCheck %s --check-prefix=NOVALUES
// A decode step's nn.Linear: a few rows against the weight as stored ([out, in]) through a
// transpose becomes a call to the hand-written CPU dispatch (compiler/kernels.py gives the
// declaration its body); one declaration per shape.
// CHECK-DAG: func.func private @polyarch_rowdot_1x256x64_f32(tensor<1x64xf32>, tensor<256x64xf32>) -> tensor<1x256xf32> attributes {polyarch.kernel = "rowdot"}
// CHECK-DAG: func.func private @polyarch_rowdot_5x32x64_f16(tensor<5x64xf16>, tensor<32x64xf16>) -> tensor<5x32xf16> attributes {polyarch.kernel = "rowdot"}
// CHECK-DAG: func.func private @polyarch_rowdot_Dx256x64_f32(tensor<?x64xf32>, tensor<256x64xf32>) -> tensor<?x256xf32> attributes {polyarch.kernel = "rowdot"}
// One declaration for a group of weights (@qkv below): one result each.
// CHECK-DAG: func.func private @polyarch_rowdot_1x64_32_32x64_f16(tensor<1x64xf16>, tensor<64x64xf16>, tensor<32x64xf16>, tensor<32x64xf16>) -> (tensor<1x64xf16>, tensor<1x32xf16>, tensor<1x32xf16>) attributes {polyarch.kernel = "rowdot"}
// One batched declaration for attention's scores (@scores below).
// CHECK-DAG: func.func private @polyarch_rowmix_b2x2_2x48x16_f32(tensor<4x2x48xf32>, tensor<2x2x48x16xf32>) -> tensor<4x2x16xf32> attributes {polyarch.kernel = "rowmix"}
// CHECK-DAG: func.func private @polyarch_rowdot_b2x2_2x48x16_f32(tensor<4x2x16xf32>, tensor<2x2x48x16xf32>) -> tensor<4x2x48xf32> attributes {polyarch.kernel = "rowdot"}
// CHECK-LABEL: func.func @linear
// CHECK-NOT: torch.aten.mm
// CHECK-NOT: torch.aten.permute
// CHECK: %[[X:.*]] = "torch_c.to_builtin_tensor"(%arg0) : (!torch.vtensor<[1,64],f32>) -> tensor<1x64xf32>
// CHECK: %[[W:.*]] = "torch_c.to_builtin_tensor"(%arg1) : (!torch.vtensor<[256,64],f32>) -> tensor<256x64xf32>
// CHECK: %[[Y:.*]] = call @polyarch_rowdot_1x256x64_f32(%[[X]], %[[W]])
// CHECK: %[[R:.*]] = "torch_c.from_builtin_tensor"(%[[Y]]) : (tensor<1x256xf32>) -> !torch.vtensor<[1,256],f32>
// CHECK: %[[X2:.*]] = "torch_c.to_builtin_tensor"(%arg2)
// CHECK: call @polyarch_rowdot_1x256x64_f32(%[[X2]], %{{.*}})
// CHECK-LABEL: func.func @verify_rows
// CHECK: call @polyarch_rowdot_5x32x64_f16
// A dynamic row count (prefill's prompt) in f32: the dynamic-row kernel.
// CHECK-LABEL: func.func @dynamic_rows
// CHECK: "torch_c.to_builtin_tensor"(%arg0) : (!torch.vtensor<[?,64],f32>) -> tensor<?x64xf32>
// CHECK: call @polyarch_rowdot_Dx256x64_f32
// CHECK: "torch_c.from_builtin_tensor"(%{{.*}}) : (tensor<?x256xf32>) -> !torch.vtensor<[?,256],f32>
// Left as they are: a dynamic row count in 16 bits, more rows than max-rows, an operand not
// transposed, K not a multiple of 16, mixed dtypes.
// CHECK-LABEL: func.func @dynamic_rows_f16
// CHECK: torch.aten.mm
// CHECK-LABEL: func.func @many_rows
// CHECK: torch.aten.mm
// CHECK-LABEL: func.func @not_transposed
// CHECK: torch.aten.mm
// CHECK-LABEL: func.func @odd_k
// CHECK: torch.aten.mm
// CHECK-LABEL: func.func @mixed
// CHECK: torch.aten.mm
// A layer's q, k and v projections (each nn.Linear views the same hidden state for itself):
// one dispatch, one result each, at the first projection; a fourth product of another x
// (the output projection) alone. With group=false: one call each.
// CHECK-LABEL: func.func @qkv
// CHECK-NOT: torch.aten.mm
// CHECK: %[[XQ:.*]] = torch.aten.view %arg0
// CHECK: %[[XB:.*]] = "torch_c.to_builtin_tensor"(%[[XQ]])
// CHECK: %[[Y:.*]]:3 = call @polyarch_rowdot_1x64_32_32x64_f16(%[[XB]], %{{.*}}, %{{.*}}, %{{.*}}) : (tensor<1x64xf16>, tensor<64x64xf16>, tensor<32x64xf16>, tensor<32x64xf16>) -> (tensor<1x64xf16>, tensor<1x32xf16>, tensor<1x32xf16>)
// CHECK-DAG: "torch_c.from_builtin_tensor"(%[[Y]]#0) : (tensor<1x64xf16>) -> !torch.vtensor<[1,64],f16>
// CHECK-DAG: "torch_c.from_builtin_tensor"(%[[Y]]#1) : (tensor<1x32xf16>) -> !torch.vtensor<[1,32],f16>
// CHECK-DAG: "torch_c.from_builtin_tensor"(%[[Y]]#2) : (tensor<1x32xf16>) -> !torch.vtensor<[1,32],f16>
// CHECK: call @polyarch_rowdot_1x64x64_f16(
// CHECK-NOT: call @polyarch_rowdot
// CHECK: return
// A weight defined after the first product (it would not dominate the call): each alone.
// CHECK-LABEL: func.func @late_weight
// CHECK: call @polyarch_rowdot_1x32x64_f32(
// CHECK: call @polyarch_rowdot_1x32x64_f32(
// ALONE-LABEL: func.func @qkv
// ALONE: call @polyarch_rowdot_1x64x64_f16(
// ALONE: call @polyarch_rowdot_1x32x64_f16(
// ALONE: call @polyarch_rowdot_1x32x64_f16(
// ALONE: call @polyarch_rowdot_1x64x64_f16(

// A decode step's attention scores: the queries of each key/value head ([sequences x kv
// heads, query rows, head dim]) against the cached keys as the cache stores them ([sequences,
// kv heads, positions, head dim], permuted [0, 1, 3, 2] and viewed 3-D): one batched dispatch
// over the sequences x kv heads, the cache read in place (no transposed copy); also a 3-D
// weight transposed by transpose.int. Left as they are: the scores by the values (the cache
// not transposed), a batch past 64 products. With batched=false: no bmm rewritten.
// CHECK-LABEL: func.func @scores
// CHECK-NOT: torch.aten.bmm
// CHECK: %[[Q:.*]] = "torch_c.to_builtin_tensor"(%arg0) : (!torch.vtensor<[4,2,16],f32>) -> tensor<4x2x16xf32>
// CHECK: %[[K:.*]] = "torch_c.to_builtin_tensor"(%arg1) : (!torch.vtensor<[2,2,48,16],f32>) -> tensor<2x2x48x16xf32>
// CHECK: %[[S:.*]] = call @polyarch_rowdot_b2x2_2x48x16_f32(%[[Q]], %[[K]])
// CHECK: "torch_c.from_builtin_tensor"(%[[S]]) : (tensor<4x2x48xf32>) -> !torch.vtensor<[4,2,48],f32>
// CHECK-LABEL: func.func @transposed_3d
// CHECK: call @polyarch_rowdot_b3_1x32x16_f16(
// Attention's values: the probabilities against the cache as stored, its view gone (rowmix).
// CHECK-LABEL: func.func @values
// CHECK-NOT: torch.aten.view
// CHECK: %[[P:.*]] = "torch_c.to_builtin_tensor"(%arg0) : (!torch.vtensor<[4,2,48],f32>) -> tensor<4x2x48xf32>
// CHECK: %[[V:.*]] = "torch_c.to_builtin_tensor"(%arg1) : (!torch.vtensor<[2,2,48,16],f32>) -> tensor<2x2x48x16xf32>
// CHECK: %[[O:.*]] = call @polyarch_rowmix_b2x2_2x48x16_f32(%[[P]], %[[V]])
// CHECK: "torch_c.from_builtin_tensor"(%[[O]]) : (tensor<4x2x16xf32>) -> !torch.vtensor<[4,2,16],f32>
// CHECK-NOT: torch.aten.bmm
// A 3-D batch of matrices as stored (no view): its leading dim is the batch.
// CHECK-LABEL: func.func @values_3d
// CHECK: call @polyarch_rowmix_b3_1x32x16_f16(
// CHECK-LABEL: func.func @too_many
// CHECK: torch.aten.bmm
// UNBATCHED-LABEL: func.func @scores
// UNBATCHED: torch.aten.bmm
// UNBATCHED-LABEL: func.func @transposed_3d
// UNBATCHED: torch.aten.bmm
// NOVALUES-LABEL: func.func @scores
// NOVALUES: call @polyarch_rowdot_b2x2_2x48x16_f32
// NOVALUES-LABEL: func.func @values
// NOVALUES: torch.aten.bmm
// NOVALUES-LABEL: func.func @values_3d
// NOVALUES: torch.aten.bmm
func.func @linear(%x: !torch.vtensor<[1,64],f32>, %w: !torch.vtensor<[256,64],f32>, %x2: !torch.vtensor<[1,64],f32>) -> (!torch.vtensor<[1,256],f32>, !torch.vtensor<[1,256],f32>) {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %p = torch.prim.ListConstruct %int1, %int0 : (!torch.int, !torch.int) -> !torch.list<int>
  %wt = torch.aten.permute %w, %p : !torch.vtensor<[256,64],f32>, !torch.list<int> -> !torch.vtensor<[64,256],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[1,64],f32>, !torch.vtensor<[64,256],f32> -> !torch.vtensor<[1,256],f32>
  %wt2 = torch.aten.t %w : !torch.vtensor<[256,64],f32> -> !torch.vtensor<[64,256],f32>
  %y2 = torch.aten.mm %x2, %wt2 : !torch.vtensor<[1,64],f32>, !torch.vtensor<[64,256],f32> -> !torch.vtensor<[1,256],f32>
  return %y, %y2 : !torch.vtensor<[1,256],f32>, !torch.vtensor<[1,256],f32>
}

func.func @verify_rows(%x: !torch.vtensor<[5,64],f16>, %w: !torch.vtensor<[32,64],f16>) -> !torch.vtensor<[5,32],f16> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %wt = torch.aten.transpose.int %w, %int0, %int1 : !torch.vtensor<[32,64],f16>, !torch.int, !torch.int -> !torch.vtensor<[64,32],f16>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[5,64],f16>, !torch.vtensor<[64,32],f16> -> !torch.vtensor<[5,32],f16>
  return %y : !torch.vtensor<[5,32],f16>
}

func.func @dynamic_rows(%x: !torch.vtensor<[?,64],f32>, %w: !torch.vtensor<[256,64],f32>) -> !torch.vtensor<[?,256],f32> {
  %wt = torch.aten.t %w : !torch.vtensor<[256,64],f32> -> !torch.vtensor<[64,256],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[?,64],f32>, !torch.vtensor<[64,256],f32> -> !torch.vtensor<[?,256],f32>
  return %y : !torch.vtensor<[?,256],f32>
}

func.func @dynamic_rows_f16(%x: !torch.vtensor<[?,64],f16>, %w: !torch.vtensor<[256,64],f16>) -> !torch.vtensor<[?,256],f16> {
  %wt = torch.aten.t %w : !torch.vtensor<[256,64],f16> -> !torch.vtensor<[64,256],f16>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[?,64],f16>, !torch.vtensor<[64,256],f16> -> !torch.vtensor<[?,256],f16>
  return %y : !torch.vtensor<[?,256],f16>
}

func.func @many_rows(%x: !torch.vtensor<[9,64],f32>, %w: !torch.vtensor<[256,64],f32>) -> !torch.vtensor<[9,256],f32> {
  %wt = torch.aten.t %w : !torch.vtensor<[256,64],f32> -> !torch.vtensor<[64,256],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[9,64],f32>, !torch.vtensor<[64,256],f32> -> !torch.vtensor<[9,256],f32>
  return %y : !torch.vtensor<[9,256],f32>
}

func.func @not_transposed(%x: !torch.vtensor<[1,64],f32>, %w: !torch.vtensor<[64,256],f32>) -> !torch.vtensor<[1,256],f32> {
  %y = torch.aten.mm %x, %w : !torch.vtensor<[1,64],f32>, !torch.vtensor<[64,256],f32> -> !torch.vtensor<[1,256],f32>
  return %y : !torch.vtensor<[1,256],f32>
}

func.func @odd_k(%x: !torch.vtensor<[1,24],f32>, %w: !torch.vtensor<[256,24],f32>) -> !torch.vtensor<[1,256],f32> {
  %wt = torch.aten.t %w : !torch.vtensor<[256,24],f32> -> !torch.vtensor<[24,256],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[1,24],f32>, !torch.vtensor<[24,256],f32> -> !torch.vtensor<[1,256],f32>
  return %y : !torch.vtensor<[1,256],f32>
}

func.func @mixed(%x: !torch.vtensor<[1,64],f16>, %w: !torch.vtensor<[256,64],f32>) -> !torch.vtensor<[1,256],f32> {
  %wt = torch.aten.t %w : !torch.vtensor<[256,64],f32> -> !torch.vtensor<[64,256],f32>
  %y = torch.aten.mm %x, %wt : !torch.vtensor<[1,64],f16>, !torch.vtensor<[64,256],f32> -> !torch.vtensor<[1,256],f32>
  return %y : !torch.vtensor<[1,256],f32>
}

func.func @qkv(%h: !torch.vtensor<[1,1,64],f16>, %wq: !torch.vtensor<[64,64],f16>, %wk: !torch.vtensor<[32,64],f16>, %wv: !torch.vtensor<[32,64],f16>, %wo: !torch.vtensor<[64,64],f16>) -> (!torch.vtensor<[1,64],f16>, !torch.vtensor<[1,32],f16>, !torch.vtensor<[1,32],f16>, !torch.vtensor<[1,64],f16>) {
  %int1 = torch.constant.int 1
  %int64 = torch.constant.int 64
  %s1 = torch.prim.ListConstruct %int1, %int64 : (!torch.int, !torch.int) -> !torch.list<int>
  %xq = torch.aten.view %h, %s1 : !torch.vtensor<[1,1,64],f16>, !torch.list<int> -> !torch.vtensor<[1,64],f16>
  %wqt = torch.aten.t %wq : !torch.vtensor<[64,64],f16> -> !torch.vtensor<[64,64],f16>
  %q = torch.aten.mm %xq, %wqt : !torch.vtensor<[1,64],f16>, !torch.vtensor<[64,64],f16> -> !torch.vtensor<[1,64],f16>
  %s2 = torch.prim.ListConstruct %int1, %int64 : (!torch.int, !torch.int) -> !torch.list<int>
  %xk = torch.aten.view %h, %s2 : !torch.vtensor<[1,1,64],f16>, !torch.list<int> -> !torch.vtensor<[1,64],f16>
  %wkt = torch.aten.t %wk : !torch.vtensor<[32,64],f16> -> !torch.vtensor<[64,32],f16>
  %k = torch.aten.mm %xk, %wkt : !torch.vtensor<[1,64],f16>, !torch.vtensor<[64,32],f16> -> !torch.vtensor<[1,32],f16>
  %xv = torch.aten.view %h, %s2 : !torch.vtensor<[1,1,64],f16>, !torch.list<int> -> !torch.vtensor<[1,64],f16>
  %wvt = torch.aten.t %wv : !torch.vtensor<[32,64],f16> -> !torch.vtensor<[64,32],f16>
  %v = torch.aten.mm %xv, %wvt : !torch.vtensor<[1,64],f16>, !torch.vtensor<[64,32],f16> -> !torch.vtensor<[1,32],f16>
  %wot = torch.aten.t %wo : !torch.vtensor<[64,64],f16> -> !torch.vtensor<[64,64],f16>
  %o = torch.aten.mm %q, %wot : !torch.vtensor<[1,64],f16>, !torch.vtensor<[64,64],f16> -> !torch.vtensor<[1,64],f16>
  return %q, %k, %v, %o : !torch.vtensor<[1,64],f16>, !torch.vtensor<[1,32],f16>, !torch.vtensor<[1,32],f16>, !torch.vtensor<[1,64],f16>
}

func.func @late_weight(%x: !torch.vtensor<[1,64],f32>, %w: !torch.vtensor<[32,64],f32>) -> (!torch.vtensor<[1,32],f32>, !torch.vtensor<[1,32],f32>) {
  %wt = torch.aten.t %w : !torch.vtensor<[32,64],f32> -> !torch.vtensor<[64,32],f32>
  %a = torch.aten.mm %x, %wt : !torch.vtensor<[1,64],f32>, !torch.vtensor<[64,32],f32> -> !torch.vtensor<[1,32],f32>
  %w2 = torch.aten.neg %w : !torch.vtensor<[32,64],f32> -> !torch.vtensor<[32,64],f32>
  %w2t = torch.aten.t %w2 : !torch.vtensor<[32,64],f32> -> !torch.vtensor<[64,32],f32>
  %b = torch.aten.mm %x, %w2t : !torch.vtensor<[1,64],f32>, !torch.vtensor<[64,32],f32> -> !torch.vtensor<[1,32],f32>
  return %a, %b : !torch.vtensor<[1,32],f32>, !torch.vtensor<[1,32],f32>
}

func.func @scores(%q: !torch.vtensor<[4,2,16],f32>, %cache: !torch.vtensor<[2,2,48,16],f32>) -> !torch.vtensor<[4,2,48],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int3 = torch.constant.int 3
  %int4 = torch.constant.int 4
  %int16 = torch.constant.int 16
  %int48 = torch.constant.int 48
  %p = torch.prim.ListConstruct %int0, %int1, %int3, %int2 : (!torch.int, !torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %kt = torch.aten.permute %cache, %p : !torch.vtensor<[2,2,48,16],f32>, !torch.list<int> -> !torch.vtensor<[2,2,16,48],f32>
  %shape = torch.prim.ListConstruct %int4, %int16, %int48 : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %k3 = torch.aten.view %kt, %shape : !torch.vtensor<[2,2,16,48],f32>, !torch.list<int> -> !torch.vtensor<[4,16,48],f32>
  %s = torch.aten.bmm %q, %k3 : !torch.vtensor<[4,2,16],f32>, !torch.vtensor<[4,16,48],f32> -> !torch.vtensor<[4,2,48],f32>
  return %s : !torch.vtensor<[4,2,48],f32>
}

func.func @transposed_3d(%x: !torch.vtensor<[3,1,16],f16>, %w: !torch.vtensor<[3,32,16],f16>) -> !torch.vtensor<[3,1,32],f16> {
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %wt = torch.aten.transpose.int %w, %int1, %int2 : !torch.vtensor<[3,32,16],f16>, !torch.int, !torch.int -> !torch.vtensor<[3,16,32],f16>
  %y = torch.aten.bmm %x, %wt : !torch.vtensor<[3,1,16],f16>, !torch.vtensor<[3,16,32],f16> -> !torch.vtensor<[3,1,32],f16>
  return %y : !torch.vtensor<[3,1,32],f16>
}

func.func @values(%p: !torch.vtensor<[4,2,48],f32>, %cache: !torch.vtensor<[2,2,48,16],f32>) -> !torch.vtensor<[4,2,16],f32> {
  %int4 = torch.constant.int 4
  %int16 = torch.constant.int 16
  %int48 = torch.constant.int 48
  %shape = torch.prim.ListConstruct %int4, %int48, %int16 : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %v3 = torch.aten.view %cache, %shape : !torch.vtensor<[2,2,48,16],f32>, !torch.list<int> -> !torch.vtensor<[4,48,16],f32>
  %o = torch.aten.bmm %p, %v3 : !torch.vtensor<[4,2,48],f32>, !torch.vtensor<[4,48,16],f32> -> !torch.vtensor<[4,2,16],f32>
  return %o : !torch.vtensor<[4,2,16],f32>
}

func.func @values_3d(%p: !torch.vtensor<[3,1,32],f16>, %v: !torch.vtensor<[3,32,16],f16>) -> !torch.vtensor<[3,1,16],f16> {
  %o = torch.aten.bmm %p, %v : !torch.vtensor<[3,1,32],f16>, !torch.vtensor<[3,32,16],f16> -> !torch.vtensor<[3,1,16],f16>
  return %o : !torch.vtensor<[3,1,16],f16>
}

func.func @too_many(%x: !torch.vtensor<[65,1,16],f32>, %w: !torch.vtensor<[65,32,16],f32>) -> !torch.vtensor<[65,1,32],f32> {
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %wt = torch.aten.transpose.int %w, %int1, %int2 : !torch.vtensor<[65,32,16],f32>, !torch.int, !torch.int -> !torch.vtensor<[65,16,32],f32>
  %y = torch.aten.bmm %x, %wt : !torch.vtensor<[65,1,16],f32>, !torch.vtensor<[65,16,32],f32> -> !torch.vtensor<[65,1,32],f32>
  return %y : !torch.vtensor<[65,1,32],f32>
}
