// RUN: polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu,vulkan}' | FileCheck %s
// RUN: polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu,vulkan pin=torch.aten.mm=cpu}' | FileCheck %s --check-prefix=PIN
// RUN: polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu,vulkan pin=head=cpu}' | FileCheck %s --check-prefix=PATH
// RUN: polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu}' | FileCheck %s --check-prefix=CPU
// RUN: not polyarch-opt %s -p 'annotate-costs,assign-devices{devices=vulkan}' 2>&1 | FileCheck %s --check-prefix=NOCPU
// RUN: not polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu,tpu}' 2>&1 | FileCheck %s --check-prefix=BADDEV
// RUN: not polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu,vulkan pin=torch.aten.nope=cpu}' 2>&1 | FileCheck %s --check-prefix=BADPIN

// CHECK: module attributes {polyarch.devices = ["cpu", "vulkan"], polyarch.plan = {algorithm = "exact: dynamic programming over program order (contiguous segments)", objective = "latency"
// The i64 gather cannot go to the default Vulkan target, and says why.
// CHECK: torch.aten.embedding {{.*}}polyarch.device = "cpu", polyarch.reason = "vulkan cannot run it: si64 tensors need the Int64 capability
// The large matmuls are predicted faster on the Vulkan profile.
// CHECK: torch.aten.mm {{.*}}polyarch.device = "vulkan", polyarch.time_us = {cpu = {{[0-9.e+]+}} : f64, vulkan = {{[0-9.e+]+}} : f64}
// CHECK: torch.aten.mm {{.*}}polyarch.device = "vulkan"

// PIN: torch.aten.mm {{.*}}polyarch.device = "cpu", polyarch.reason = "pinned by user (torch.aten.mm=cpu)"
// PIN: torch.aten.mm {{.*}}polyarch.device = "cpu"

// PATH: torch.aten.mm {{.*}}polyarch.device = "vulkan"
// PATH: torch.aten.mm {{.*}}polyarch.device = "cpu", polyarch.reason = "pinned by user (head=cpu)"

// CPU-NOT: "vulkan"
// CPU: torch.aten.embedding {{.*}}polyarch.device = "cpu"

// NOCPU: unsupported op: torch.aten.embedding (embed) at model.py:3 cannot run on any target device (vulkan cannot run it: si64 tensors
// BADDEV: unknown device kind 'tpu' in 'tpu'
// BADPIN: pin 'torch.aten.nope=cpu' matched no op

func.func @main(%ids: !torch.vtensor<[64,128],si64>) -> !torch.vtensor<[64,128,512],f32> {
  %table = torch.vtensor.literal(dense<1.0> : tensor<1000x512xf32>) : !torch.vtensor<[1000,512],f32>
  %w1 = torch.vtensor.literal(dense<1.0> : tensor<512x512xf32>) : !torch.vtensor<[512,512],f32>
  %int-1 = torch.constant.int -1
  %false = torch.constant.bool false
  %int8192 = torch.constant.int 8192
  %int512 = torch.constant.int 512
  %int64 = torch.constant.int 64
  %int128 = torch.constant.int 128
  %e = torch.aten.embedding %table, %ids, %int-1, %false, %false : !torch.vtensor<[1000,512],f32>, !torch.vtensor<[64,128],si64>, !torch.int, !torch.bool, !torch.bool -> !torch.vtensor<[64,128,512],f32> loc(#embed)
  %s = torch.prim.ListConstruct %int8192, %int512 : (!torch.int, !torch.int) -> !torch.list<int>
  %v = torch.aten.view %e, %s : !torch.vtensor<[64,128,512],f32>, !torch.list<int> -> !torch.vtensor<[8192,512],f32> loc(#embed)
  %m1 = torch.aten.mm %v, %w1 : !torch.vtensor<[8192,512],f32>, !torch.vtensor<[512,512],f32> -> !torch.vtensor<[8192,512],f32> loc(#body)
  %m2 = torch.aten.mm %m1, %w1 : !torch.vtensor<[8192,512],f32>, !torch.vtensor<[512,512],f32> -> !torch.vtensor<[8192,512],f32> loc(#head)
  %s2 = torch.prim.ListConstruct %int64, %int128, %int512 : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %r = torch.aten.view %m2, %s2 : !torch.vtensor<[8192,512],f32>, !torch.list<int> -> !torch.vtensor<[64,128,512],f32> loc(#head)
  return %r : !torch.vtensor<[64,128,512],f32>
}
#embed = loc("embed"("model.py":3:0))
#body = loc("body.layer"("model.py":4:0))
#head = loc("head.proj"("model.py":5:0))
