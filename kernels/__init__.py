"""fluxmusic.kernels"""
