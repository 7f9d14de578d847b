/* consumer: the smallest useful libmoe program; tests/packaging builds it against an installed
 * libmoe when examples/c/moe_demo.c is not there. One inference forward of a small layer. */
#include <stdio.h>
#include <stdlib.h>

#include <moe/moe.h>

int main(void) {
  enum { T = 16, D = 8, F = 16 };
  moe_config cfg;
  moe_layer *layer = NULL;
  float *x = malloc(sizeof(float) * T * D), *y = malloc(sizeof(float) * T * D);
  double sum = 0.0;
  moe_status st;
  int i;

  if (x == NULL || y == NULL) return 1;
  if (moe_version() / 100 != MOE_VERSION_NUMBER / 100) {
    fprintf(stderr, "consumer: header %d, library %u\n", MOE_VERSION_NUMBER, moe_version());
    return 1;
  }
  moe_config_init(&cfg);
  cfg.d_model = D;
  cfg.d_ff = F;
  cfg.num_experts = 4;
  cfg.top_k = 2;
  st = moe_layer_create(&cfg, &layer);
  if (st != MOE_OK) {
    fprintf(stderr, "consumer: moe_layer_create: %s: %s\n", moe_status_name(st), moe_last_error());
    return 1;
  }
  for (i = 0; i < T * D; ++i) x[i] = (float)((i * 37) % 17) / 17.0f - 0.5f;
  st = moe_forward(layer, x, T, y, NULL);
  if (st != MOE_OK) {
    fprintf(stderr, "consumer: moe_forward: %s: %s\n", moe_status_name(st), moe_last_error());
    moe_layer_destroy(layer);
    return 1;
  }
  for (i = 0; i < T * D; ++i) sum += y[i] * (double)y[i];
  printf("libmoe %u: %d tokens through %lld experts, |y|^2 = %.6f\n", moe_version(), T,
         (long long)cfg.num_experts, sum);
  moe_layer_destroy(layer);
  free(x);
  free(y);
  return 0;
}
