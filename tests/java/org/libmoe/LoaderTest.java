package org.libmoe;

import static org.junit.jupiter.api.Assertions.*;

import org.junit.jupiter.api.Test;

class LoaderTest {
  @Test
  void theJarLoadsItsOwnNativeLibrary() {
    String source = Moe.nativeSource();
    assertNotNull(source);
    if (System.getProperty(NativeLoader.PATH_PROPERTY) == null) {
      // ctest runs the tests with libmoe.jar on the class path and no java.library.path set up.
      assertTrue(source.startsWith("jar:/org/libmoe/native/"), source);
    }
  }

  @Test
  void versionOfTheLoadedLibrary() {
    assertEquals(Moe.HEADER_VERSION, Moe.version());
    assertTrue(Moe.versionString().matches("\\d+\\.\\d+\\.\\d+"), Moe.versionString());
  }
}
