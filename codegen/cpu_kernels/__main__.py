"""``python -m sparsegraph.codegen.cpu_kernels``: stamp the kernel sources with their current hash
(run it after editing a ``.cpp``; then reinstall the package to rebuild the library)."""

from sparsegraph.codegen.cpu_kernels import _STAMP, SOURCES, source_hash

if __name__ == "__main__":
    stamp = source_hash()
    for path in SOURCES:
        path.write_text(_STAMP.sub(rf"\g<1>{stamp}\g<3>", path.read_text(), count=1))
        print(f"stamped {path} with {stamp}")
