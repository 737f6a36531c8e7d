// RUN: not polyarch-opt --split-input-file %s 2>&1 | FileCheck %s
// The verifier polyarch-opt runs on its input and after every pass: the polyarch.transfer
// contracts, and every polyarch.* attribute read through its typed accessor
// (dialects/polyarch.py). Each case below is one module.

// CHECK-LABEL: func.func @ok
// CHECK-SAME: polyarch.device = "cpu"
func.func @ok(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> attributes {polyarch.device = "cpu", polyarch.time_us = 2.0 : f64} {
  %y = torch.aten.neg %x {polyarch.device = "cpu", polyarch.cost = {flops = 4 : i64, bytes_read = 16 : i64, bytes_written = 16 : i64}, polyarch.time_us = {cpu = 1.0 : f64}} : !torch.vtensor<[4],f32> -> !torch.vtensor<[4],f32>
  return %y : !torch.vtensor<[4],f32>
}

// -----
// CHECK: error: input: malformed polyarch.cost on torch.aten.neg: expected {flops, bytes_read, bytes_written : i64}
func.func @main(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> {
  %y = torch.aten.neg %x {polyarch.cost = {flops = 4 : i64}} : !torch.vtensor<[4],f32> -> !torch.vtensor<[4],f32>
  return %y : !torch.vtensor<[4],f32>
}

// -----
// CHECK: error: input: malformed polyarch.time_us on torch.aten.neg: expected {<device> = f64, ...}
func.func @main(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> {
  %y = torch.aten.neg %x {polyarch.time_us = {cpu = "fast"}} : !torch.vtensor<[4],f32> -> !torch.vtensor<[4],f32>
  return %y : !torch.vtensor<[4],f32>
}

// -----
// CHECK: error: input: malformed polyarch.device or polyarch.reason on torch.aten.neg: expected a string
func.func @main(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> {
  %y = torch.aten.neg %x {polyarch.device = 3 : i64} : !torch.vtensor<[4],f32> -> !torch.vtensor<[4],f32>
  return %y : !torch.vtensor<[4],f32>
}

// -----
// CHECK: error: input: torch.aten.neg placed on vulkan inside segment @seg_0 on cpu
func.func @seg_0(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> attributes {polyarch.device = "cpu", polyarch.time_us = 1.0 : f64} {
  %y = torch.aten.neg %x {polyarch.device = "vulkan"} : !torch.vtensor<[4],f32> -> !torch.vtensor<[4],f32>
  return %y : !torch.vtensor<[4],f32>
}

// -----
// CHECK: error: input: malformed segment attributes on func.func: expected polyarch.device a string and polyarch.time_us an f64
func.func @seg_0(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> attributes {polyarch.device = "cpu", polyarch.time_us = {cpu = 1.0 : f64}} {
  return %x : !torch.vtensor<[4],f32>
}

// -----
// CHECK: error: input: polyarch.transfer from a device to itself
func.func @main(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> {
  %y = "polyarch.transfer"(%x) {from = "cpu", to = "cpu"} : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
  return %y : !torch.vtensor<[4],f32>
}

// -----
// CHECK: error: input: polyarch.transfer from host to rocm: not a device of the module's polyarch.devices (cpu, vulkan) nor 'host'
module attributes {polyarch.devices = ["cpu", "vulkan"]} {
  func.func @main(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> {
    %y = "polyarch.transfer"(%x) {from = "host", to = "rocm"} : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
    return %y : !torch.vtensor<[4],f32>
  }
}

// -----
// CHECK: error: input: polyarch.transfer takes one tensor and returns one of the same shape and type
func.func @main(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[8],f32> {
  %y = "polyarch.transfer"(%x) {from = "host", to = "cpu"} : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[8],f32>
  return %y : !torch.vtensor<[8],f32>
}

// -----
// CHECK: error: input: polyarch.transfer inside a device segment
func.func @seg_0(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> attributes {polyarch.device = "cpu"} {
  %y = "polyarch.transfer"(%x) {from = "host", to = "cpu"} : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
  return %y : !torch.vtensor<[4],f32>
}

// -----
// CHECK: error: input: unknown polyarch op 'polyarch.teleport'
func.func @main(%x: !torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32> {
  %y = "polyarch.teleport"(%x) : (!torch.vtensor<[4],f32>) -> !torch.vtensor<[4],f32>
  return %y : !torch.vtensor<[4],f32>
}

// -----
// CHECK: error: input: malformed plan attributes on builtin.module
module attributes {polyarch.devices = ["cpu"], polyarch.plan = "fast"} {
}
