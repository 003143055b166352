"""Fine-tuning Arc2Face (UNet + ID encoder) on (face photo, ArcFace embedding) pairs.

    prepare     photos -> face front end -> 512x512 crops + ids in WebDataset shards   (prepare.py)
    fit         shards -> ε-prediction MSE on VAE latents, Accelerate, checkpoints      (loop.py)
                in the released layout, so `arc2face-export onnx` and `arc2face-rt generate` use them as is

The `arc2face-train` command lives in cli.py; nothing here is imported by the runtime.
"""
