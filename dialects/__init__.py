"""The `polyarch` dialect: attribute names and the `polyarch.transfer` op."""
