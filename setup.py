"""Build hooks only (metadata is in setup.cfg): ship timm_cabvit_autoload.pth at the top of site-packages.

The .pth makes `import timm` register our models in any interpreter (see timm_cabvit_autoload.py). A wheel
gets it through build_py, as setuptools ships its own distutils-precedence.pth; an editable install's wheel
is made by editable_wheel, which leaves build_py's extra files out, so it is added to that wheel too.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = 'timm_cabvit_autoload.pth'


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWheelWithPth(editable_wheel):
    def _create_wheel_file(self, bdist_wheel):
        from wheel.wheelfile import WheelFile

        wheel_path = super()._create_wheel_file(bdist_wheel)
        with WheelFile(wheel_path, 'a') as wheel:
            wheel.write(PTH, PTH)
        return wheel_path


setup(cmdclass={'build_py': BuildPyWithPth, 'editable_wheel': EditableWheelWithPth})
