"""mura_ray: musculoskeletal radiograph classifiers on Ray."""
