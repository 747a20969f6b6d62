//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"strings"
	"testing"
)

// TestImageArchive checks the busybox image tarball without containerd:
// every blob is stored under its digest, index.json names the image Ref,
// the config's diff_ids is the layer's digest, the layer has sh as a link
// to busybox, and a layer's bytes do not depend on the order its files
// are given in (the tag depends on content only). Needs no root.
func TestImageArchive(t *testing.T) {
	img := BusyboxImage(t)
	data, err := os.ReadFile(img.Path)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		files[h.Name] = b
	}
	for name, b := range files {
		if hexd, ok := strings.CutPrefix(name, "blobs/sha256/"); ok && hexd != "" {
			sum := sha256.Sum256(b)
			if hex.EncodeToString(sum[:]) != hexd {
				t.Errorf("blob %s has digest %x", name, sum)
			}
		}
	}
	blob := func(d descriptor) []byte {
		b, ok := files[blobPath(d)]
		if !ok {
			t.Fatalf("no blob %s", d.Digest)
		}
		return b
	}
	var index struct{ Manifests []descriptor }
	if err := json.Unmarshal(files["index.json"], &index); err != nil || len(index.Manifests) != 1 {
		t.Fatalf("index.json: %v %s", err, files["index.json"])
	}
	if got := index.Manifests[0].Annotations[annotationName]; got != img.Ref {
		t.Errorf("image name %q, want %q", got, img.Ref)
	}
	var manifest struct {
		Config descriptor
		Layers []descriptor
	}
	if err := json.Unmarshal(blob(index.Manifests[0]), &manifest); err != nil || len(manifest.Layers) != 1 {
		t.Fatalf("manifest: %v", err)
	}
	var config struct {
		RootFS struct {
			DiffIDs []string `json:"diff_ids"`
		} `json:"rootfs"`
	}
	if err := json.Unmarshal(blob(manifest.Config), &config); err != nil {
		t.Fatal(err)
	}
	if len(config.RootFS.DiffIDs) != 1 || config.RootFS.DiffIDs[0] != manifest.Layers[0].Digest {
		t.Errorf("diff_ids %v, want [%s] (an uncompressed layer)", config.RootFS.DiffIDs, manifest.Layers[0].Digest)
	}
	layer := blob(manifest.Layers[0])
	links := map[string]string{}
	lr := tar.NewReader(bytes.NewReader(layer))
	for {
		h, err := lr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeSymlink {
			links[h.Name] = h.Linkname
		}
	}
	if links["bin/sh"] != "/bin/busybox" || links["usr/sbin/httpd"] != "/bin/busybox" {
		t.Errorf("bin/sh -> %q, usr/sbin/httpd -> %q, want /bin/busybox", links["bin/sh"], links["usr/sbin/httpd"])
	}
	again, err := layerTar([]layerFile{{Name: "a/b", Mode: 0o644, Data: []byte("x")}, {Name: "c", Mode: 0o777 | os.ModeSymlink, Link: "/a/b"}})
	if err != nil {
		t.Fatal(err)
	}
	once, _ := layerTar([]layerFile{{Name: "c", Mode: 0o777 | os.ModeSymlink, Link: "/a/b"}, {Name: "a/b", Mode: 0o644, Data: []byte("x")}})
	if !bytes.Equal(again, once) {
		t.Error("layerTar depends on the order of its files")
	}
}
