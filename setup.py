"""What setup.cfg cannot say: files the wheel carries from outside the package tree.

- ``vkd_shim.pth`` at the top of site-packages: CPython's ``site`` runs its one line at every interpreter
  start, so ``VKD_ENABLE=1`` alone activates the shim in ``swift``, its re-exec and every torchrun worker,
  with no sitecustomize and no PYTHONPATH (the line reads one variable and returns when it is unset).
- ``configs/*.yaml`` as ``vkd_shim/example_configs/``, so ``vkd-shim configs`` and ``python -m
  vkd_shim.demo`` work from an installed wheel, not only from a checkout.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PTH = ROOT / "vkd_shim" / "bootstrap" / "vkd_shim.pth"


class BuildWithStartupHook(build_py):
    def run(self) -> None:
        super().run()
        for source, target in self._extra():
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), *(str(target) for _, target in self._extra())]

    def _extra(self) -> list[tuple[Path, Path]]:
        lib = Path(self.build_lib)
        configs = [
            (path, lib / "vkd_shim" / "example_configs" / path.name)
            for path in sorted((ROOT / "configs").glob("*.yaml"))
        ]
        return [(PTH, lib / PTH.name), *configs]


setup(cmdclass={"build_py": BuildWithStartupHook})
