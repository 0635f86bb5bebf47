"""Import of torchvision weights into segjax (`python -m segjax.convert`).

    python -m segjax.convert --from=torchvision --arch=resnet101 \\
        --input=resnet101-63fe2227.pth --output=/tmp/resnet101_tv

writes an Orbax checkpoint of segjax variables (`segjax.convert.checkpoint`) that
`config.init_from` loads when a run starts (`segjax.train.init_from`). Layout rules
and the supported architectures: `segjax.convert.from_torchvision`. torch is
imported only to read the `.pth` file (`pip install "segjax[convert]"`).
"""
