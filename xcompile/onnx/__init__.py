"""ONNX files of compiled policies, one job per module: writing them (`model`), the deployment
contract they carry (`contract`), opening an untrusted one in onnxruntime (`session`), and reading
and rewriting their graphs (`graph`).

Imports are absolute, so `import onnx` inside this package is the third-party package.
"""
