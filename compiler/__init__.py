"""The compile side: import (torch-mlir), targets, IREE driver and bundle writer."""
