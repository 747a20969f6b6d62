package hostnet

import "unsafe"

// unsafePointer points at the start of b (an inotify event read from the
// kernel, in its native layout).
func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(&b[0]) }
