"""Zero-knowledge proofs: ZoKrates circuits, their build, and the provers that use them."""
