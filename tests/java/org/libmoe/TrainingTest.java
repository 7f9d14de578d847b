package org.libmoe;

import static org.junit.jupiter.api.Assertions.*;
import static org.libmoe.TestData.*;

import java.nio.FloatBuffer;
import java.util.ArrayList;
import java.util.List;
import org.junit.jupiter.api.Test;

/**
 * A training loop of many steps: a layer learns a random linear map y = A x from fresh batches,
 * with plain SGD written through the zero-copy parameter views.
 */
class TrainingTest {
  @Test
  void theLossFallsOverManySteps() {
    int d = 16, tokens = 64, steps = 150;
    float lr = 0.3f;
    float[] a = data(d * d, 5); // A, uniform in +-1/sqrt(d)
    for (int i = 0; i < a.length; i++) a[i] /= (float) Math.sqrt(d);
    try (Layer student = Config.builder(d, 32).numExperts(4).topK(2).activation(Activation.RELU).seed(7).createLayer();
        Context ctx = student.newContext()) {
      // the student's trainable parameters, once: the views stay valid across steps
      List<FloatBuffer[]> params = new ArrayList<>();
      for (ParamInfo p : student.params()) {
        if (!p.trainable()) continue;
        ParamView v = student.paramView(p.name());
        params.add(new FloatBuffer[] {v.data(), v.grad()});
      }
      float[] y = new float[tokens * d];
      float[] dy = new float[tokens * d];
      double first = Double.NaN, last = Double.NaN;
      double[] curve = new double[steps];
      for (int step = 0; step < steps; step++) {
        float[] x = data(tokens * d, 1000 + step); // a fresh batch every step
        float[] target = new float[x.length];
        for (int t = 0; t < tokens; t++)
          for (int i = 0; i < d; i++) {
            float v = 0;
            for (int j = 0; j < d; j++) v += a[i * d + j] * x[t * d + j];
            target[t * d + i] = v;
          }
        ctx.forward(x, y);
        double loss = 0;
        for (int i = 0; i < y.length; i++) {
          float r = y[i] - target[i];
          loss += 0.5 * r * r / tokens;
          dy[i] = r / tokens;
        }
        ctx.backward(dy, null);
        for (FloatBuffer[] pg : params) {
          FloatBuffer w = pg[0], g = pg[1];
          for (int i = 0; i < w.capacity(); i++) w.put(i, w.get(i) - lr * g.get(i));
        }
        student.zeroGrad();
        assertTrue(Double.isFinite(loss), "step " + step);
        curve[step] = loss;
        if (step == 0) first = loss;
        last = loss;
      }
      // means over 10 steps on either end, so one hard batch cannot decide
      double head = 0, tail = 0;
      for (int i = 0; i < 10; i++) {
        head += curve[i] / 10;
        tail += curve[steps - 1 - i] / 10;
      }
      System.out.printf("mean loss of the first 10 steps %.5f, of the last 10 %.5f%n", head, tail);
      assertTrue(tail < 0.25 * head, String.format("loss fell from %.5f to %.5f only (first %.5f, last %.5f)", head, tail, first, last));
    }
  }
}
