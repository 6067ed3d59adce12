"""fluxmusic.export"""
