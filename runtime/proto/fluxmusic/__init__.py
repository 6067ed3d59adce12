"""Generated code of the fluxmusic protobuf packages (see fluxmusic.runtime.codegen)."""
