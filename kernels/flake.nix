{
  description = "jdlora-kernels: Triton kernels for mixed-adapter JD-LoRA serving (kernel-builder noarch build)";

  inputs = {
    kernel-builder.url = "github:huggingface/kernels";
  };

  outputs =
    { self, kernel-builder, ... }:
    kernel-builder.lib.genKernelFlakeOutputs {
      inherit self;
      path = ./.;
    };
}
