"""fluxmusic.runtime"""
