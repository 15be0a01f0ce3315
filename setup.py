"""Build: the C++ core as a plain shared library, and the AQUA_ALLOC start-up hook.

The core (csrc/) is compiled with the C++17 compiler against the CUDA driver API header
(cuda.h) only: it links neither libcuda nor libcudart (the driver is loaded at run time), so
it loads on machines with no GPU. cuda.h is taken from CUDA_HOME / CUDA_PATH / CUDA_ROOT,
then a CUDA toolkit in the usual places, then NVIDIA's `nvidia-cuda-runtime` pip package
(a build requirement in pyproject.toml, so `pip install .` needs no toolkit); when none has
it the build stops and says where it looked.
"""

import glob
import os
import shutil
import site
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

try:  # setuptools >= 64: PEP 660 editable installs
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover
    editable_wheel = None

HERE = os.path.dirname(os.path.abspath(__file__))
STARTUP_PTH = "aqua_alloc_startup.pth"


def _site_dirs():
    """Every site-packages this build can see: sys.path (pip's isolated build environment is
    on it), then the interpreter's own (a --no-build-isolation build into a venv)."""
    dirs = list(sys.path)
    for key in ("purelib", "platlib"):
        dirs.append(sysconfig.get_paths().get(key, ""))
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # pragma: no cover - old virtualenv's site module
        pass
    seen, out = set(), []
    for d in dirs:
        if d and os.path.isdir(d) and os.path.realpath(d) not in seen:
            seen.add(os.path.realpath(d))
            out.append(d)
    return out


def find_cuda_include():
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates += ["/usr/local/cuda/include", "/opt/cuda/include", "/usr/include"]
    candidates += sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)
    # The headers in NVIDIA's pip packages: nvidia-cuda-runtime (CUDA 13: nvidia/cu13/include,
    # the build requirement) and nvidia-cuda-runtime-cu12 (nvidia/cuda_runtime/include).
    for path in _site_dirs():
        candidates += sorted(glob.glob(os.path.join(path, "nvidia", "cu[0-9]*", "include")), reverse=True)
        candidates += glob.glob(os.path.join(path, "nvidia", "cuda_runtime", "include"))
    for inc in candidates:
        if os.path.isfile(os.path.join(inc, "cuda.h")):
            print(f"aqua_alloc: building the core against {os.path.join(inc, 'cuda.h')}")
            return inc
    sys.exit(
        "aqua_alloc: cannot build the C++ core: cuda.h (the CUDA driver API header) was not found.\n"
        "Looked in: " + ", ".join(candidates) + "\n"
        "`pip install .` (with build isolation, the default) brings it in NVIDIA's nvidia-cuda-runtime\n"
        "package; with --no-build-isolation run `pip install nvidia-cuda-runtime` first, or set\n"
        "CUDA_HOME to a CUDA toolkit's root."
    )


class BuildCore(build_ext):
    """Builds the core with the flags of a plain C++17 shared library."""

    def build_extensions(self):
        compiler = self.compiler.compiler_cxx[0] if self.compiler.compiler_cxx else "c++"
        if shutil.which(compiler) is None and shutil.which("c++") is None:
            sys.exit("aqua_alloc: cannot build the C++ core: no C++17 compiler (c++/g++) on PATH")
        for ext in self.extensions:
            ext.include_dirs.append(find_cuda_include())
        # Compile C++ with the C++ driver (setuptools uses the C compiler for .cpp otherwise).
        self.compiler.compiler_so = [c for c in self.compiler.compiler_so if c != "-Wstrict-prototypes"]
        super().build_extensions()

    def get_export_symbols(self, ext):
        return []  # a C ABI library, not a Python module: no PyInit_ symbol


class BuildPyWithStartupHook(build_py):
    """Also installs aqua_alloc_startup.pth at the root of site-packages."""

    def run(self):
        super().run()
        src = os.path.join(HERE, "aqua_alloc", "data", STARTUP_PTH)
        dst = os.path.join(self.build_lib, STARTUP_PTH)
        self.copy_file(src, dst, preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, STARTUP_PTH)]


CMDCLASS = {"build_ext": BuildCore, "build_py": BuildPyWithStartupHook}

if editable_wheel is not None and hasattr(editable_wheel, "_run_build_commands"):

    class EditableWithStartupHook(editable_wheel):
        """`pip install -e .` also gets the start-up hook (the wheel holds the unpacked dir)."""

        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            shutil.copyfile(os.path.join(HERE, "aqua_alloc", "data", STARTUP_PTH),
                            os.path.join(unpacked_wheel, STARTUP_PTH))
            return result

    CMDCLASS["editable_wheel"] = EditableWithStartupHook


core = Extension(
    "aqua_alloc.memory._aqua_core",
    sources=sorted(glob.glob("csrc/*.cpp")),
    depends=sorted(glob.glob("csrc/*.h")),  # a header's edit rebuilds the core (build_ext compares times)
    include_dirs=["csrc"],
    language="c++",
    extra_compile_args=["-std=c++17", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    extra_link_args=["-ldl", "-pthread"],
)

setup(ext_modules=[core], cmdclass=CMDCLASS)
