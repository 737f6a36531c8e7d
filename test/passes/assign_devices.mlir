// RUN: polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu,vulkan}' | FileCheck %s
// RUN: polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu,vulkan pin=torch.aten.mm=cpu}' | FileCheck %s --check-prefix=PIN
// RUN: polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu,vulkan pin=head=cpu}' | FileCheck %s --check-prefix=PATH
// RUN: polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu}' | FileCheck %s --check-prefix=CPU
// Every solver that applies finds the same plan here, and says which it was.
// RUN: polyarch-opt %s -p 'annotate-costs{devices=cpu,vulkan},assign-devices{devices=cpu,vulkan solver=mincut}' | FileCheck %s --check-prefixes=SOLVED,MINCUT
// RUN: polyarch-opt %s -p 'annotate-costs{devices=cpu,vulkan},assign-devices{devices=cpu,vulkan solver=chain-dp}' | FileCheck %s --check-prefixes=SOLVED,CHAIN
// RUN: polyarch-opt %s -p 'annotate-costs{devices=cpu,vulkan},assign-devices{devices=cpu,vulkan solver=heft}' | FileCheck %s --check-prefixes=SOLVED,HEFT
// Objectives: a Vulkan profile that is fast but draws 50 kW loses on energy, wins on latency.
// RUN: polyarch-opt %s -p 'assign-devices{devices=cpu,vulkan objective=energy profile=%S/Inputs/hungry_gpu.json}' | FileCheck %s --check-prefix=ENERGY
// RUN: polyarch-opt %s -p 'assign-devices{devices=cpu,vulkan objective=latency:1,energy:0.001 profile=%S/Inputs/hungry_gpu.json}' | FileCheck %s --check-prefix=MIX
// RUN: polyarch-opt %s -p 'assign-devices{devices=cpu,vulkan objective=cost}' | FileCheck %s --check-prefix=COST
// RUN: polyarch-opt %s -p 'assign-devices{devices=cpu,vulkan objective=throughput}' | FileCheck %s --check-prefix=THROUGHPUT
// Memory capacity: a 4 MB device cannot hold the 16 MB activations; pinned there, it is an error.
// RUN: polyarch-opt %s -p 'assign-devices{devices=cpu,vulkan profile=%S/Inputs/tiny_gpu.json}' | FileCheck %s --check-prefix=CAPACITY
// RUN: not polyarch-opt %s -p 'assign-devices{devices=cpu,vulkan pin=body=vulkan profile=%S/Inputs/tiny_gpu.json}' 2>&1 | FileCheck %s --check-prefix=NOFIT
// Errors.
// RUN: not polyarch-opt %s -p 'annotate-costs,assign-devices{devices=vulkan}' 2>&1 | FileCheck %s --check-prefix=NOCPU
// RUN: not polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu,tpu}' 2>&1 | FileCheck %s --check-prefix=BADDEV
// RUN: not polyarch-opt %s -p 'annotate-costs,assign-devices{devices=cpu,vulkan pin=torch.aten.nope=cpu}' 2>&1 | FileCheck %s --check-prefix=BADPIN
// RUN: not polyarch-opt %s -p 'assign-devices{devices=cpu,vulkan objective=speed}' 2>&1 | FileCheck %s --check-prefix=BADOBJ
// RUN: not polyarch-opt %s -p 'assign-devices{devices=cpu,vulkan objective=throughput solver=mincut}' 2>&1 | FileCheck %s --check-prefix=BADSOLVER
// RUN: not polyarch-opt %s -p 'assign-devices{devices=cpu,vulkan profile=%S/Inputs/bad_schema.json}' 2>&1 | FileCheck %s --check-prefix=BADPROFILE

// 5 placeable ops, the gather never on Vulkan: 16 placements, enumerated.
// CHECK: module attributes {polyarch.devices = ["cpu", "vulkan"], polyarch.plan = {algorithm = "exact: enumeration of all placements", bottleneck_us = {{.*}}, cost_usd_per_1m = {{.*}}, energy_j = {{.*}}, memory_bytes = {cpu = {{[0-9]+}} : i64, vulkan = {{[0-9]+}} : i64}, objective = "latency", predicted_us = {{.*}}, transfer_bytes = 33554432 : i64}
// The i64 gather cannot go to the default Vulkan target, and says why.
// CHECK: torch.aten.embedding {{.*}}polyarch.device = "cpu", polyarch.reason = "vulkan cannot run it: si64 tensors need the Int64 capability
// The large matmuls are predicted faster on the Vulkan profile.
// CHECK: torch.aten.mm {{.*}}polyarch.device = "vulkan", polyarch.time_us = {cpu = {{[0-9.e+]+}} : f64, vulkan = {{[0-9.e+]+}} : f64}
// CHECK: torch.aten.mm {{.*}}polyarch.device = "vulkan"

// MINCUT: algorithm = "exact: minimum s-t cut (two devices)"
// CHAIN: algorithm = "exact: dynamic programming over a chain"
// HEFT: algorithm = "heuristic: HEFT-style list scheduling + local search"
// SOLVED: polyarch.profiles = {cpu = "generic-x86-cpu", vulkan = "vulkan-igpu-radeon-780m"}
// SOLVED: torch.aten.embedding {{.*}}polyarch.device = "cpu"
// SOLVED: torch.aten.mm {{.*}}polyarch.device = "vulkan"
// SOLVED: torch.aten.mm {{.*}}polyarch.device = "vulkan"

// ENERGY: objective = "energy"
// ENERGY: torch.aten.mm {{.*}}polyarch.device = "cpu", polyarch.reason = "placed on cpu for the energy objective (vulkan alone would be faster)"
// MIX: objective = "latency:1,energy:0.001"
// MIX: torch.aten.mm {{.*}}polyarch.device = "vulkan"
// The built-in iGPU profile costs $0/h: the cost objective sends the matmuls there.
// COST: objective = "cost"
// COST: torch.aten.mm {{.*}}polyarch.device = "vulkan"
// THROUGHPUT: algorithm = "exact: enumeration of all placements", bottleneck_us
// THROUGHPUT-SAME: objective = "throughput"

// CAPACITY: algorithm = "exact: enumeration of all placements + memory-capacity repair (Lagrangian penalties, heuristic)"
// CAPACITY-NOT: polyarch.device = "vulkan"
// NOFIT: the model does not fit on vulkan: needs 0.03 GiB (weights + peak activations), the profile gives 0.00 GiB

// PIN: torch.aten.mm {{.*}}polyarch.device = "cpu", polyarch.reason = "pinned by user (torch.aten.mm=cpu)"
// PIN: torch.aten.mm {{.*}}polyarch.device = "cpu"

// PATH: torch.aten.mm {{.*}}polyarch.device = "vulkan"
// PATH: torch.aten.mm {{.*}}polyarch.device = "cpu", polyarch.reason = "pinned by user (head=cpu)"

// CPU-NOT: "vulkan"
// CPU: torch.aten.embedding {{.*}}polyarch.device = "cpu"

// NOCPU: unsupported op: torch.aten.embedding (embed) at model.py:3 cannot run on any target device (vulkan cannot run it: si64 tensors
// BADDEV: unknown device kind 'tpu' in 'tpu'
// BADPIN: pin 'torch.aten.nope=cpu' matched no op
// BADOBJ: unknown objective 'speed'. Fix: use latency, cost, energy, throughput, or a mix like latency:1,energy:0.5
// BADSOLVER: solver=mincut: mincut solves additive objectives only (latency, cost, energy), not throughput
// BADPROFILE: bad_schema.json has schema 'polyarch-device-profile/9'; this polyarch reads 'polyarch-device-profile/1'

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
