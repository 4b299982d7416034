"""Make generated stubs importable as part of the `serving.proto` package.

protoc writes `from cifar10.classifier.v1 import classifier_pb2`; inside our package that
must be `from serving.proto.cifar10...`. Only our own packages are rewritten (google.* stays).
"""

import re
import sys
from pathlib import Path

OWN_PACKAGES = ("cifar10", "inference")


def main(out_dir: str) -> None:
    root = Path(out_dir)
    pattern = re.compile(rf"^(from|import) ({'|'.join(OWN_PACKAGES)})([. ])", re.MULTILINE)
    for path in root.rglob("*.py*"):
        text = path.read_text()
        path.write_text(pattern.sub(r"\1 serving.proto.\2\3", text))
    for directory in [root, *[d for d in root.rglob("*") if d.is_dir()]]:
        (directory / "__init__.py").touch()


if __name__ == "__main__":
    main(sys.argv[1])
