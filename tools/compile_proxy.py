"""`make compile`: compile the sidecar's request path with mypyc, in place.

    python tools/compile_proxy.py [--clean]

The modules in meshctl.proxy.build.COMPILED become extension modules next to their .py
files (one shared library for the group, so calls between them are direct), and
meshctl/proxy/_compiled.json records the sha256 of each source and the stamp of each file
built: the package refuses to run a compiled module whose source changed since (it runs the
.py files and the sidecar logs why). Without a C compiler or mypyc this says so and leaves
the pure-Python build in place. --clean deletes what an earlier run built.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from meshctl.proxy import build  # noqa: E402

GROUP = "meshctl.proxy.engine"


def clean() -> None:
    for name in build.extensions():
        os.remove(os.path.join(build.PACKAGE_DIR, name))
    manifest = os.path.join(build.PACKAGE_DIR, build.MANIFEST)
    if os.path.exists(manifest):
        os.remove(manifest)


def compile_in_place() -> int:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        print("no C compiler (%s): the sidecar runs pure Python" % compiler)
        return 0
    try:
        from mypyc.build import mypycify
        from setuptools import setup
    except ImportError:
        print("mypyc is not installed (pip install mypy): the sidecar runs pure Python")
        return 0
    import mypy.version

    started = time.monotonic()
    if os.path.exists(os.path.join(build.PACKAGE_DIR, build.MANIFEST)) and build.stale_reason() is None:
        print("the compiled request path is up to date")
        return 0
    clean()
    sources = [os.path.join("meshctl", "proxy", module + ".py") for module in build.COMPILED]
    # The other modules are read for their types only; a type error in a compiled one fails the build.
    options = ["--ignore-missing-imports", "--follow-imports=silent"]
    os.chdir(ROOT)
    with tempfile.TemporaryDirectory(prefix="meshctl-compile-") as scratch:
        extensions = mypycify(options + sources, opt_level="2", group_name=GROUP, target_dir=os.path.join(scratch, "c"))
        setup(
            name="meshctl-engine",
            ext_modules=extensions,
            script_args=["--quiet", "build_ext", "--inplace", "--parallel", str(os.cpu_count() or 1),
                         "--build-temp", os.path.join(scratch, "o"), "--build-lib", os.path.join(scratch, "lib")],
        )
    manifest = {"compiler": "mypyc %s" % mypy.version.__version__, "modules": {}, "shared": {}}
    for module in build.COMPILED:
        built = build.extension_path(module)
        if built is None:
            print("mypyc built no extension for %s" % module, file=sys.stderr)
            clean()
            return 1
        manifest["modules"][module] = {
            "source_sha256": build.source_sha256(os.path.join(build.PACKAGE_DIR, module + ".py")),
            "file": os.path.basename(built),
            "stamp": build.file_stamp(built),
        }
    for path in glob.glob(os.path.join(build.PACKAGE_DIR, "engine__mypyc.*.so")):
        manifest["shared"][os.path.basename(path)] = build.file_stamp(path)
    with open(os.path.join(build.PACKAGE_DIR, build.MANIFEST), "w", encoding="utf-8") as file:
        json.dump(manifest, file, indent=1)
    print("compiled %d modules with %s in %.1f s" % (len(build.COMPILED), manifest["compiler"], time.monotonic() - started))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", action="store_true", help="delete the compiled files and run pure Python")
    args = parser.parse_args()
    if args.clean:
        clean()
        return 0
    return compile_in_place()


if __name__ == "__main__":
    sys.exit(main())
