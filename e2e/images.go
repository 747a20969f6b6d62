//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// Container images without a registry. The harness writes each image as
// an OCI image layout tarball (oci-layout, index.json, blobs/sha256/...)
// with one uncompressed layer, names it with the containerd annotation
// io.containerd.image.name, and caches it by the layer's digest; a test
// imports it into its containerd (Containerd.Import) and pods use it with
// imagePullPolicy: Never.

// ImageRegistry is the registry part of every image name the harness
// makes. Nothing serves it (.test is reserved): a pull of one of these
// images fails, which shows up at once if a pod forgets
// imagePullPolicy: Never.
const ImageRegistry = "trellis.test/e2e"

// BusyboxPath is the static busybox binary (Debian's busybox-static) that
// the busybox image holds.
const BusyboxPath = "/bin/busybox"

// Image is an image tarball made by the harness.
type Image struct {
	// Ref is the image's name for pod specs and containerd, e.g.
	// trellis.test/e2e/busybox:3f1c2a9b0d4e; its tag is a prefix of the
	// layer's digest, so a changed image never hides behind an old name.
	Ref string
	// Path is the OCI image layout tarball.
	Path string
	// Bytes is the tarball's size.
	Bytes int64
}

// images caches the images made by this test binary; the files are cached
// across runs too (see imageCacheDir).
var images struct {
	mu    sync.Mutex
	built map[string]Image
}

// PauseImage returns the sandbox image: the static e2e/pause program as
// /pause, its entrypoint. It builds the program (go build, cached) the
// first time a test binary asks.
func PauseImage(t testing.TB) Image {
	t.Helper()
	return cachedImage(t, "pause", func() ([]layerFile, imageConfig, error) {
		root, err := moduleRoot()
		if err != nil {
			return nil, imageConfig{}, err
		}
		dir, err := os.MkdirTemp("", "trellis-e2e-pause-")
		if err != nil {
			return nil, imageConfig{}, err
		}
		defer os.RemoveAll(dir)
		bin := filepath.Join(dir, "pause")
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "./e2e/pause")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, imageConfig{}, fmt.Errorf("build the pause program: go build ./e2e/pause in %s: %w\n%s", root, err, out)
		}
		data, err := os.ReadFile(bin)
		if err != nil {
			return nil, imageConfig{}, err
		}
		files := []layerFile{{Name: "pause", Mode: 0o755, Data: data}}
		return files, imageConfig{Entrypoint: []string{"/pause"}}, nil
	})
}

// BusyboxImage returns an image of BusyboxPath with a link for each of its
// applets (busybox --list-full), a root user, /tmp and the usual empty
// directories. Its default command is sh. It skips the test when busybox
// is not installed (apt-get install busybox-static), or fails it with
// TRELLIS_REQUIRE_KUBE=1.
func BusyboxImage(t testing.TB) Image {
	t.Helper()
	if _, err := os.Stat(BusyboxPath); err != nil {
		msg := fmt.Sprintf("the busybox image needs a static busybox at %s (apt-get install busybox-static): %v", BusyboxPath, err)
		if os.Getenv("TRELLIS_REQUIRE_KUBE") == "1" {
			t.Fatal(msg + " (TRELLIS_REQUIRE_KUBE=1)")
		}
		t.Skip(msg)
	}
	return cachedImage(t, "busybox", func() ([]layerFile, imageConfig, error) {
		data, err := os.ReadFile(BusyboxPath)
		if err != nil {
			return nil, imageConfig{}, err
		}
		out, err := exec.Command(BusyboxPath, "--list-full").Output()
		if err != nil {
			return nil, imageConfig{}, fmt.Errorf("%s --list-full: %w", BusyboxPath, err)
		}
		files := []layerFile{
			{Name: "bin/busybox", Mode: 0o755, Data: data},
			{Name: "etc/passwd", Mode: 0o644, Data: []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")},
			{Name: "etc/group", Mode: 0o644, Data: []byte("root:x:0:\nnogroup:x:65534:\n")},
			{Name: "tmp", Mode: 0o1777 | os.ModeDir},
		}
		for _, d := range []string{"dev", "proc", "sys", "root", "var", "etc", "usr/bin", "usr/sbin", "sbin"} {
			files = append(files, layerFile{Name: d, Mode: 0o755 | os.ModeDir})
		}
		for _, applet := range strings.Fields(string(out)) {
			if applet != "bin/busybox" {
				files = append(files, layerFile{Name: applet, Mode: 0o777 | os.ModeSymlink, Link: "/bin/busybox"})
			}
		}
		return files, imageConfig{
			Cmd: []string{"sh"},
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		}, nil
	})
}

// cachedImage returns image name made from build's files, writing its
// tarball into the cache unless a tarball of the same layer is there.
func cachedImage(t testing.TB, name string, build func() ([]layerFile, imageConfig, error)) Image {
	t.Helper()
	images.mu.Lock()
	defer images.mu.Unlock()
	if img, ok := images.built[name]; ok {
		return img
	}
	files, cfg, err := build()
	if err != nil {
		t.Fatalf("make image %s: %v", name, err)
	}
	layer, err := layerTar(files)
	if err != nil {
		t.Fatalf("make image %s: %v", name, err)
	}
	sum := sha256.Sum256(layer)
	tag := hex.EncodeToString(sum[:6])
	img := Image{Ref: ImageRegistry + "/" + name + ":" + tag}
	dir, err := imageCacheDir()
	if err != nil {
		t.Fatal(err)
	}
	img.Path = filepath.Join(dir, name+"-"+tag+".tar")
	if st, err := os.Stat(img.Path); err == nil {
		img.Bytes = st.Size()
	} else {
		archive, err := ociArchive(img.Ref, layer, cfg)
		if err != nil {
			t.Fatalf("make image %s: %v", name, err)
		}
		// Written under a temporary name and renamed, so that a
		// concurrent test binary never reads half a file.
		tmp := fmt.Sprintf("%s.%d.tmp", img.Path, os.Getpid())
		if err := os.WriteFile(tmp, archive, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, img.Path); err != nil {
			t.Fatal(err)
		}
		img.Bytes = int64(len(archive))
	}
	if images.built == nil {
		images.built = map[string]Image{}
	}
	images.built[name] = img
	return img
}

// imageCacheDir is where image tarballs are kept between runs:
// ${XDG_CACHE_HOME:-~/.cache}/trellis-e2e/images.
func imageCacheDir() (string, error) {
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("image cache: %w", err)
		}
		cache = filepath.Join(home, ".cache")
	}
	dir := filepath.Join(cache, "trellis-e2e", "images")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("image cache: %w", err)
	}
	return dir, nil
}

// layerFile is one entry of an image layer: a regular file (Data), a
// directory (Mode has os.ModeDir) or a symbolic link (os.ModeSymlink,
// Link). Name is relative to the image's root.
type layerFile struct {
	Name string
	Mode os.FileMode
	Data []byte
	Link string
}

// layerTime is the modification time of every layer entry: layers are
// reproducible, so their digests (and the image tags) change only when
// their content does.
var layerTime = time.Unix(946684800, 0).UTC() // 2000-01-01

// layerTar returns an uncompressed layer holding files, owned by root,
// with the parent directories that files leave out, in name order.
func layerTar(files []layerFile) ([]byte, error) {
	entries := map[string]layerFile{}
	for _, f := range files {
		name := path.Clean(f.Name)
		if name == "." || strings.HasPrefix(name, "../") || path.IsAbs(name) {
			return nil, fmt.Errorf("layer entry %q: want a relative path inside the image", f.Name)
		}
		f.Name = name
		entries[name] = f
		for d := path.Dir(name); d != "."; d = path.Dir(d) {
			if _, ok := entries[d]; !ok {
				entries[d] = layerFile{Name: d, Mode: 0o755 | os.ModeDir}
			}
		}
	}
	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		f := entries[n]
		h := &tar.Header{Name: n, Mode: int64(f.Mode.Perm()), ModTime: layerTime, Format: tar.FormatPAX}
		if f.Mode&os.ModeSticky != 0 {
			h.Mode |= 0o1000
		}
		switch {
		case f.Mode.IsDir():
			h.Typeflag, h.Name = tar.TypeDir, n+"/"
		case f.Mode&os.ModeSymlink != 0:
			h.Typeflag, h.Linkname = tar.TypeSymlink, f.Link
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("layer entry %s: %w", n, err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(f.Data); err != nil {
				return nil, fmt.Errorf("layer entry %s: %w", n, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// imageConfig is the part of the OCI image configuration that the
// harness sets.
type imageConfig struct {
	Entrypoint []string `json:"Entrypoint,omitempty"`
	Cmd        []string `json:"Cmd,omitempty"`
	Env        []string `json:"Env,omitempty"`
	WorkingDir string   `json:"WorkingDir,omitempty"`
}

// OCI media types and annotations (image-spec v1.0; containerd's image
// name annotation is what `ctr images import` names the image by).
const (
	mediaTypeIndex    = "application/vnd.oci.image.index.v1+json"
	mediaTypeManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeConfig   = "application/vnd.oci.image.config.v1+json"
	mediaTypeLayer    = "application/vnd.oci.image.layer.v1.tar"
	annotationName    = "io.containerd.image.name"
	annotationRefName = "org.opencontainers.image.ref.name"
)

type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

// ociArchive returns an OCI image layout tarball of one image named ref
// for linux on this machine's architecture, with layer as its only
// layer.
func ociArchive(ref string, layer []byte, cfg imageConfig) ([]byte, error) {
	if cfg.WorkingDir == "" {
		cfg.WorkingDir = "/"
	}
	arch := runtime.GOARCH
	layerDesc := blobDescriptor(mediaTypeLayer, layer)
	config, err := json.Marshal(map[string]any{
		"architecture": arch,
		"os":           "linux",
		"created":      layerTime.Format(time.RFC3339),
		"config":       cfg,
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{layerDesc.Digest}},
		"history":      []map[string]any{{"created": layerTime.Format(time.RFC3339), "created_by": "trellis e2e harness (e2e/images.go)"}},
	})
	if err != nil {
		return nil, err
	}
	configDesc := blobDescriptor(mediaTypeConfig, config)
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaTypeManifest,
		"config":        configDesc,
		"layers":        []descriptor{layerDesc},
	})
	if err != nil {
		return nil, err
	}
	manifestDesc := blobDescriptor(mediaTypeManifest, manifest)
	manifestDesc.Platform = &platform{Architecture: arch, OS: "linux"}
	manifestDesc.Annotations = map[string]string{annotationName: ref, annotationRefName: ref[strings.LastIndexByte(ref, ':')+1:]}
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     mediaTypeIndex,
		"manifests":     []descriptor{manifestDesc},
	})
	if err != nil {
		return nil, err
	}

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, data []byte) error {
		h := &tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: layerTime, Typeflag: tar.TypeReg}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	for _, dir := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Name: dir, Mode: 0o755, ModTime: layerTime, Typeflag: tar.TypeDir}); err != nil {
			return nil, err
		}
	}
	for _, f := range []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{blobPath(layerDesc), layer},
		{blobPath(configDesc), config},
		{blobPath(manifestDesc), manifest},
	} {
		if err := add(f.name, f.data); err != nil {
			return nil, fmt.Errorf("image archive %s: %w", f.name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func blobDescriptor(mediaType string, data []byte) descriptor {
	sum := sha256.Sum256(data)
	return descriptor{MediaType: mediaType, Digest: "sha256:" + hex.EncodeToString(sum[:]), Size: int64(len(data))}
}

func blobPath(d descriptor) string {
	return "blobs/sha256/" + strings.TrimPrefix(d.Digest, "sha256:")
}
