"""entropy_kernels"""
