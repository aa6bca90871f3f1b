"""Input and output: ONNX export checked in ONNX Runtime (:mod:`.onnx`), save/load of pruned
models (:mod:`.save`), batches of user data (:mod:`.data`) and the offline Fashion-MNIST
loader (:mod:`.datasets`)."""
